//! The Kubernetes operator against a real kube-apiserver and etcd (scripts/envtest), with real
//! hub, edge, operator and coturn processes. Each test runs in a private network namespace it
//! creates (so that EndpointSlices and Service cluster IPs can carry real, non-loopback
//! addresses), and the operator runs with the ServiceAccount and RBAC of the Helm chart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN_TOKEN: &str = "operator-test-admin-token";
const HUB_NAMESPACE: &str = "remoteingress";
/// How long a step that goes through the API server, the operator and a hub may take: both
/// tests run at once, each with its own API server, on two cores.
const API_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
/// The address coturn answers on (in the test's own network namespace), so the edge's public IP
/// is a known value; a global unicast one, since the hub ignores any other.
const PUBLIC_IP: &str = "1.2.3.4";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Moves this test's thread (and every process and socket it makes from now on) into a new
/// network namespace with loopback up and `addresses` on it.
fn private_network(addresses: &[&str]) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a private network namespace (the operator tests run as root, as CI does)");
    ip(&["link", "set", "lo", "up"]);
    for address in addresses {
        add_address(address);
    }
}

fn add_address(address: &str) {
    ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

/// kube-apiserver and etcd on loopback, stopped on drop.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new(repo().join("scripts/envtest"))
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "scripts/envtest start (run `scripts/envtest build` once): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { dir };
        cluster.kubectl(&["create", "namespace", HUB_NAMESPACE], None);
        cluster.kubectl(
            &["apply", "-f", "deploy/crds/edges.remoteingress.dev.yaml"],
            None,
        );
        cluster.kubectl(
            &[
                "wait",
                "--for=condition=established",
                "crd/edges.remoteingress.dev",
                "--timeout=30s",
            ],
            None,
        );
        cluster
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs kubectl as admin; panics with its output on failure.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.try_kubectl(args, stdin);
        assert!(output.0, "kubectl {args:?}: {}", output.1);
        output.1
    }

    /// Runs kubectl as admin: success and stdout (or stderr on failure).
    fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .current_dir(repo())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed by ./scripts/test");
        let mut input = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut input, stdin.unwrap_or_default().as_bytes()).unwrap();
        drop(input);
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            (true, String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            (false, String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get", "-o", "json"];
        all.extend(args);
        let (ok, out) = self.try_kubectl(&all, None);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    /// The chart's operator RBAC applied, and a kubeconfig for its ServiceAccount's token.
    fn operator_kubeconfig(&self) -> PathBuf {
        let helm = helm();
        let rendered = Command::new(helm)
            .args([
                "template",
                "t",
                "deploy/helm/remoteingress",
                "--namespace",
                HUB_NAMESPACE,
            ])
            .args([
                "--set",
                "adminToken.value=x",
                "--set",
                "operator.enabled=true",
            ])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            rendered.status.success(),
            "{}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let rbac: Vec<String> = String::from_utf8_lossy(&rendered.stdout)
            .split("\n---")
            .filter(|doc| {
                [
                    "ServiceAccount",
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "Role",
                    "RoleBinding",
                ]
                .iter()
                .any(|kind| doc.contains(&format!("\nkind: {kind}\n")))
                    && doc.contains("-operator")
            })
            .map(str::to_owned)
            .collect();
        assert!(rbac.len() >= 5, "the chart renders the operator's RBAC");
        self.kubectl(
            &["apply", "-n", HUB_NAMESPACE, "-f", "-"],
            Some(&rbac.join("\n---\n")),
        );
        let token = self.kubectl(
            &[
                "create",
                "token",
                "t-remoteingress-operator",
                "-n",
                HUB_NAMESPACE,
                "--duration=1h",
            ],
            None,
        );
        let admin = std::fs::read_to_string(self.kubeconfig()).unwrap();
        let user_start = admin.find("users:").unwrap();
        let context_start = admin.find("contexts:").unwrap();
        let operator = format!(
            "{}users:\n- name: admin\n  user:\n    token: {}\n{}",
            &admin[..user_start],
            token.trim(),
            &admin[context_start..]
        );
        let path = self.dir.path().join("operator.kubeconfig");
        std::fs::write(&path, operator).unwrap();
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/envtest"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn helm() -> PathBuf {
    let gopath = Command::new("go").args(["env", "GOPATH"]).output().unwrap();
    let gobin = PathBuf::from(String::from_utf8_lossy(&gopath.stdout).trim()).join("bin");
    ["/usr/local/bin", "/usr/bin"]
        .iter()
        .map(PathBuf::from)
        .chain([gobin])
        .map(|dir| dir.join("helm"))
        .find(|path| path.exists())
        .expect("helm is installed by ./scripts/test")
}

/// The name the hubs' admin certificate carries: their Service's, as the operator checks it.
const HUB_SERVER_NAME: &str = "t-remoteingress-admin.remoteingress.svc";

/// A hub process whose admin API listens on `admin` (a non-loopback address of the namespace).
struct Hub {
    admin: SocketAddr,
    tunnel_port: u16,
    state: tempfile::TempDir,
    id: String,
    replica: bool,
    /// The admin API's TLS (CA directory), or plain HTTP.
    tls: Option<std::sync::Arc<TestCa>>,
    process: Option<Process>,
}

impl Hub {
    async fn start(id: &str, admin: SocketAddr, replica: bool) -> Self {
        Self::start_with_tls(id, admin, replica, None).await
    }

    async fn start_with_tls(
        id: &str,
        admin: SocketAddr,
        replica: bool,
        tls: Option<std::sync::Arc<TestCa>>,
    ) -> Self {
        let mut hub = Self {
            admin,
            tunnel_port: free_port(IpAddr::from([127, 0, 0, 1])),
            state: tempfile::tempdir().unwrap(),
            id: id.to_owned(),
            replica,
            tls,
            process: None,
        };
        hub.restart().await;
        hub
    }

    async fn restart(&mut self) {
        self.process = None;
        let mut args = vec![
            "hub".to_owned(),
            format!("--tunnel-port={}", self.tunnel_port),
            "--listen-address=127.0.0.1".into(),
            format!("--state-dir={}", self.state.path().display()),
            format!("--admin-addr={}", self.admin),
            format!(
                "--metrics-addr=127.0.0.1:{}",
                free_port(IpAddr::from([127, 0, 0, 1]))
            ),
            format!("--hub-id={}", self.id),
            "--public-host=127.0.0.1".into(),
            format!("--public-port={}", self.tunnel_port),
            "--no-quic".into(),
        ];
        if self.replica {
            args.push("--replica".into());
        }
        if let Some(tls) = &self.tls {
            args.push(format!(
                "--admin-tls-cert={}",
                tls.file("tls.crt").display()
            ));
            args.push(format!("--admin-tls-key={}", tls.file("tls.key").display()));
        }
        self.process = Some(spawn_binary(
            &args,
            &[("REMOTEINGRESS_ADMIN_TOKEN", ADMIN_TOKEN)],
        ));
        let admin = self.admin;
        eventually_within(API_DEADLINE, "the hub's admin API", || async move {
            TcpStream::connect(admin).await.ok().map(|_| ())
        })
        .await;
    }

    /// The hub's edges, from its admin API.
    async fn edges(&self) -> Vec<remoteingress_controlplane::pb::EdgeInfo> {
        let endpoint = match &self.tls {
            Some(tls) => {
                let ca = std::fs::read(tls.file("ca.crt")).unwrap();
                let config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name(HUB_SERVER_NAME);
                tonic::transport::Endpoint::from_shared(format!("https://{}", self.admin))
                    .unwrap()
                    .tls_config(config)
                    .unwrap()
            }
            None => {
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.admin)).unwrap()
            }
        };
        let channel = endpoint.connect().await.unwrap();
        let mut admin =
            remoteingress_controlplane::pb::hub_admin_client::HubAdminClient::with_interceptor(
                channel,
                with_token as fn(_) -> _,
            );
        admin
            .list_edges(remoteingress_controlplane::pb::ListEdgesRequest {})
            .await
            .unwrap()
            .into_inner()
            .edges
    }
}

/// Adds the admin bearer token to a call.
#[allow(clippy::result_large_err)]
fn with_token(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// The EndpointSlice that lists the hubs' admin API, as Kubernetes would for the chart's
/// admin Service.
fn hub_slice(hubs: &[&Hub]) -> String {
    let port = hubs[0].admin.port();
    let endpoints: Vec<String> = hubs
        .iter()
        .map(|hub| {
            format!(
                "{{addresses: [\"{}\"], conditions: {{ready: true}}}}",
                hub.admin.ip()
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hubs\n  \
         namespace: {HUB_NAMESPACE}\n  labels: {{kubernetes.io/service-name: t-remoteingress-admin}}\n\
         addressType: IPv4\nports: [{{name: admin, port: {port}, protocol: TCP}}]\n\
         endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// The operator, reaching the hubs over plain HTTP/2 (explicitly allowed).
fn operator(kubeconfig: &Path) -> Process {
    operator_with(kubeconfig, "--hub-plaintext".into())
}

/// The operator with `hub_access`: `--hub-plaintext` or `--hub-ca-file=…`.
fn operator_with(kubeconfig: &Path, hub_access: String) -> Process {
    operator_as(kubeconfig, &[hub_access], &[]).0
}

/// The operator with more `args` and `env`, and the address of its metrics and probes.
fn operator_as(kubeconfig: &Path, args: &[String], env: &[(&str, &str)]) -> (Process, SocketAddr) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port(IpAddr::from([127, 0, 0, 1]))));
    let mut all = vec![
        "operator".into(),
        format!("--hub-namespace={HUB_NAMESPACE}"),
        "--hub-service=t-remoteingress-admin".into(),
        "--resync-secs=1".into(),
        format!("--metrics-addr={metrics}"),
    ];
    all.extend_from_slice(args);
    let mut environment = vec![
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("REMOTEINGRESS_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    environment.extend_from_slice(env);
    (spawn_binary(&all, &environment), metrics)
}

/// What must be the same on every hub: id, ports, generation, target hosts.
type EdgeView = (String, Vec<u32>, u64, Vec<(u32, String)>);

/// coturn answering STUN on PUBLIC_IP:`port`.
fn coturn(port: u16) -> Process {
    let binary = ["/usr/bin/turnserver", "/usr/sbin/turnserver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("coturn is installed by ./scripts/test");
    Process(
        Command::new(binary)
            .args([
                "--stun-only",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
            ])
            .args([
                "--no-rfc5780",
                "--no-software-attribute",
                "--log-file=stdout",
            ])
            .arg(format!("--listening-ip={PUBLIC_IP}"))
            .arg(format!("--listening-port={port}"))
            .arg("--pidfile=/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn condition(edge: &Value, kind: &str) -> Option<(String, String)> {
    edge["status"]["conditions"]
        .as_array()?
        .iter()
        .find_map(|c| {
            (c["type"] == kind).then(|| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
}

/// A UDP target on `addr` that echoes every datagram but the PROXY v2 header of a session.
async fn udp_echo(addr: SocketAddr) {
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if !buf[..n].starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
}

/// A TCP target on `addr` that answers each connection with the PROXY line it received.
async fn header_echo(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8];
                while socket.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let _ = socket.write_all(&line).await;
            });
        }
    });
}

#[tokio::test]
async fn edges_and_load_balancer_services_through_a_real_api_server() {
    private_network(&["10.244.0.1", PUBLIC_IP]);
    let cluster = Cluster::start();
    let operator_kubeconfig = cluster.operator_kubeconfig();
    let hub = Hub::start("hub-a", "10.244.0.1:18444".parse().unwrap(), false).await;
    cluster.apply(&hub_slice(&[&hub]));
    let stun_port = free_port(IpAddr::from([127, 0, 0, 1]));
    let _coturn = coturn(stun_port);
    let _operator = operator(&operator_kubeconfig);

    // The API server refuses what the schema forbids.
    let (ok, refused) = cluster.try_kubectl(
        &["apply", "-f", "-"],
        Some("apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {name: bad}\nspec: {listenPorts: [0, 80, 80], firewallConfig: {blockedIps: [10.0.0.0/33], rateLimits: [{id: r, port: 80, rate: 5/fortnight}]}}\n"),
    );
    assert!(!ok);
    for field in ["listenPorts[0]", "listenPorts[2]", "blockedIps[0]", "rate"] {
        assert!(refused.contains(field), "{field}: {refused}");
    }

    // A complete Edge: ports only. The operator makes its secret and token.
    let first = free_port(IpAddr::from([0, 0, 0, 0]));
    cluster.apply(&format!(
        "apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {{name: e1, namespace: default}}\nspec: {{listenPorts: [{first}]}}\n"
    ));
    let token = eventually_within(API_DEADLINE, "the token Secret", || async {
        let secret = cluster.get(&["secret", "e1-token"])?;
        let encoded = secret["data"]["token"].as_str()?;
        let decoded =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).ok()?;
        String::from_utf8(decoded).ok()
    })
    .await;
    let _edge = spawn_binary(
        &[
            "edge".into(),
            format!("--token={token}"),
            format!("--stun-server={PUBLIC_IP}:{stun_port}"),
            "--firewall=off".into(),
            "--bind-address=127.0.0.1".into(),
            format!(
                "--status-addr=127.0.0.1:{}",
                free_port(IpAddr::from([127, 0, 0, 1]))
            ),
            format!(
                "--metrics-addr=127.0.0.1:{}",
                free_port(IpAddr::from([127, 0, 0, 1]))
            ),
            "--reconnect-min-ms=50".into(),
            "--reconnect-max-secs=1".into(),
        ],
        &[],
    );
    let applied_generation =
        eventually_within(API_DEADLINE, "e1 Connected and ConfigApplied", || async {
            let edge = cluster.get(&["edge", "e1"])?;
            let connected = condition(&edge, "Connected")?;
            let applied = condition(&edge, "ConfigApplied")?;
            (connected.0 == "True"
                && applied.0 == "True"
                && edge["status"]["publicIp"] == PUBLIC_IP)
                .then(|| edge["status"]["appliedGeneration"].as_u64())?
        })
        .await;
    assert_eq!(
        cluster.get(&["edge", "e1"]).unwrap()["status"]["hubs"],
        serde_json::json!(["hub-a"])
    );

    // Changing the ports reaches the edge; the generation rises.
    let second = free_port(IpAddr::from([0, 0, 0, 0]));
    cluster.apply(&format!(
        "apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {{name: e1, namespace: default}}\nspec: {{listenPorts: [{second}]}}\n"
    ));
    eventually_within(
        API_DEADLINE,
        "the edge to listen on the new port",
        || async {
            TcpStream::connect(("127.0.0.1", second))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    eventually_within(API_DEADLINE, "the new generation applied", || async {
        let edge = cluster.get(&["edge", "e1"])?;
        (edge["status"]["appliedGeneration"].as_u64()? > applied_generation).then_some(())
    })
    .await;

    // A LoadBalancer Service of our class: its ports on the edge reach its cluster IP.
    let service_port = free_port(IpAddr::from([0, 0, 0, 0]));
    let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let service = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: LoadBalancer, \
             loadBalancerClass: remoteingress.dev/edge, ports: [{{name: web, port: {service_port}, protocol: TCP}}, \
             {{name: dns, port: {udp_port}, protocol: UDP}}]}}\n"
        )
    };
    cluster.apply(&service("web"));
    let cluster_ip = cluster.get(&["service", "web"]).unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    add_address(&cluster_ip);
    header_echo(SocketAddr::new(cluster_ip.parse().unwrap(), service_port)).await;
    udp_echo(SocketAddr::new(cluster_ip.parse().unwrap(), udp_port)).await;
    let header = eventually_within(
        API_DEADLINE,
        "a client through the edge to reach the Service",
        || async {
            let mut client = TcpStream::connect(("127.0.0.1", service_port)).await.ok()?;
            let local = client.local_addr().ok()?;
            let mut header = String::new();
            client.read_to_string(&mut header).await.ok()?;
            (!header.is_empty()).then_some((header, local))
        },
    )
    .await;
    assert!(
        header.0.starts_with(&format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {service_port}",
            header.1.port()
        )),
        "{header:?}"
    );
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", udp_port)).await.unwrap();
    eventually_within(
        API_DEADLINE,
        "a datagram through the edge to reach the Service and back",
        || async {
            client.send(b"ping").await.ok()?;
            let mut reply = [0u8; 16];
            let n = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                client.recv(&mut reply),
            )
            .await
            .ok()?
            .ok()?;
            (&reply[..n] == b"ping").then_some(())
        },
    )
    .await;
    eventually_within(
        API_DEADLINE,
        "the Service's load balancer status",
        || async {
            let web = cluster.get(&["service", "web"])?;
            let ingress = web["status"]["loadBalancer"]["ingress"].as_array()?.clone();
            (ingress.len() == 1 && ingress[0]["ip"] == PUBLIC_IP).then_some(())
        },
    )
    .await;

    // A second Service wanting the same port on the same edge is refused with an Event.
    cluster.apply(&service("clash"));
    eventually_within(
        API_DEADLINE,
        "a PortClash event on the younger Service",
        || async {
            let events = cluster.get(&[
                "events.events.k8s.io",
                "--field-selector",
                "regarding.name=clash",
            ])?;
            events["items"]
                .as_array()?
                .iter()
                .any(|e| e["reason"] == "PortClash")
                .then_some(())
        },
    )
    .await;

    // Deleting the Services removes the port.
    cluster.kubectl(&["delete", "service", "web", "clash"], None);
    eventually_within(API_DEADLINE, "the Service's port to close", || async {
        TcpStream::connect(("127.0.0.1", service_port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(hub
        .edges()
        .await
        .iter()
        .all(|e| !e.listen_ports.contains(&u32::from(service_port))));
}

#[tokio::test]
async fn every_hub_replica_gets_the_same_config_and_a_restarted_one_is_resynced() {
    private_network(&["10.244.0.1", "10.244.0.2"]);
    let cluster = Cluster::start();
    let operator_kubeconfig = cluster.operator_kubeconfig();
    let mut a = Hub::start("hub-a", "10.244.0.1:18444".parse().unwrap(), true).await;
    let b = Hub::start("hub-b", "10.244.0.2:18444".parse().unwrap(), true).await;
    cluster.apply(&hub_slice(&[&a, &b]));
    let _operator = operator(&operator_kubeconfig);
    for name in ["e1", "e2"] {
        cluster.apply(&format!(
            "apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {{name: {name}, namespace: default}}\nspec: {{listenPorts: [80, 443], targetHosts: {{\"443\": web}}}}\n"
        ));
    }
    let same = |hubs: Vec<Vec<remoteingress_controlplane::pb::EdgeInfo>>| {
        let views: Vec<Vec<EdgeView>> = hubs
            .into_iter()
            .map(|edges| {
                edges
                    .into_iter()
                    .map(|e| {
                        (
                            e.id,
                            e.listen_ports,
                            e.generation,
                            e.target_hosts.into_iter().collect(),
                        )
                    })
                    .collect()
            })
            .collect();
        views
            .iter()
            .all(|v| v == &views[0])
            .then(|| views[0].clone())
    };
    let before = eventually_within(
        API_DEADLINE,
        "both hubs to hold both edges alike",
        || async { same(vec![a.edges().await, b.edges().await]).filter(|view| view.len() == 2) },
    )
    .await;
    assert_eq!(before[0].3, vec![(443, "web.default.svc".to_owned())]);

    // A hub that restarts empty is re-synced at once.
    std::fs::remove_dir_all(a.state.path()).unwrap();
    std::fs::create_dir(a.state.path()).unwrap();
    a.restart().await;
    eventually_within(
        API_DEADLINE,
        "the restarted hub to be re-synced",
        || async { same(vec![a.edges().await, b.edges().await]).filter(|view| *view == before) },
    )
    .await;

    // A deleted Edge leaves every hub.
    cluster.kubectl(&["delete", "edge", "e2"], None);
    eventually_within(API_DEADLINE, "e2 to leave both hubs", || async {
        same(vec![a.edges().await, b.edges().await])
            .filter(|view| view.len() == 1 && view[0].0 == "e1")
    })
    .await;

    // An Edge that cannot be built now (its Secret is missing) is reported, and its edge keeps
    // the last configuration it was given.
    cluster.apply(
        "apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {name: e1, namespace: default}\n\
         spec: {listenPorts: [8080], secretRef: {name: missing}}\n",
    );
    eventually_within(API_DEADLINE, "e1 reported as not buildable", || async {
        let edge = cluster.get(&["edge", "e1"])?;
        let (status, reason) = condition(&edge, "ConfigApplied")?;
        (status == "False" && reason == "Invalid").then_some(())
    })
    .await;
    let kept = same(vec![a.edges().await, b.edges().await]).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].1, vec![80, 443]);
}

/// An Edge in `namespace` named `name` with `spec` (flow-style YAML without braces).
fn edge_yaml(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: remoteingress.dev/v1alpha1\nkind: Edge\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{{spec}}}\n"
    )
}

/// Waits until Edge `(namespace, name)` has condition `kind` with `(status, reason)`.
async fn wait_condition(
    cluster: &Cluster,
    (namespace, name): (&str, &str),
    kind: &str,
    (status, reason): (&str, &str),
    what: &str,
) {
    eventually_within(API_DEADLINE, what, || async {
        let edge = cluster.get(&["edge", "-n", namespace, name])?;
        (condition(&edge, kind)? == (status.to_owned(), reason.to_owned())).then_some(())
    })
    .await;
}

/// The generation the hub holds for `id`, if it holds it.
async fn hub_generation(hub: &Hub, id: &str) -> Option<u64> {
    hub.edges()
        .await
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.generation)
}

/// Two teams share a cluster: neither can take the other's edge id, expose the other's
/// Services, overwrite a Secret that is not its Edge's, or make a hub go back to an older
/// configuration by recreating an Edge or losing its status. The operator reaches the hubs
/// over TLS it verifies.
#[tokio::test]
async fn in_a_shared_cluster_one_edge_cannot_hurt_another() {
    private_network(&["10.244.0.1", "10.244.0.2"]);
    let cluster = Cluster::start();
    let operator_kubeconfig = cluster.operator_kubeconfig();
    // The hubs' admin API speaks TLS, and the operator verifies it.
    let tls = std::sync::Arc::new(TestCa::new(&[HUB_SERVER_NAME]));
    let a = Hub::start_with_tls(
        "hub-a",
        "10.244.0.1:18444".parse().unwrap(),
        true,
        Some(tls.clone()),
    )
    .await;
    let b = Hub::start_with_tls(
        "hub-b",
        "10.244.0.2:18444".parse().unwrap(),
        true,
        Some(tls.clone()),
    )
    .await;
    cluster.apply(&hub_slice(&[&a, &b]));
    for team in ["team-a", "team-b"] {
        cluster.kubectl(&["create", "namespace", team], None);
    }
    let _operator = operator_with(
        &operator_kubeconfig,
        format!("--hub-ca-file={}", tls.file("ca.crt").display()),
    );
    let condition_of = |namespace: &'static str, name: &'static str, kind: &'static str| {
        let cluster = &cluster;
        async move {
            let edge = cluster.get(&["edge", "-n", namespace, name])?;
            condition(&edge, kind)
        }
    };

    // An edge id belongs to the oldest Edge, whatever the namespaces' names.
    cluster.apply(&edge_yaml(
        "team-b",
        "first",
        "edgeId: shared, listenPorts: [8001]",
    ));
    eventually_within(API_DEADLINE, "team-b's edge on both hubs", || async {
        let on_a = hub_generation(&a, "shared").await?;
        let on_b = hub_generation(&b, "shared").await?;
        (on_a == on_b).then_some(())
    })
    .await;
    cluster.apply(&edge_yaml(
        "team-a",
        "second",
        "edgeId: shared, listenPorts: [9001]",
    ));
    wait_condition(
        &cluster,
        ("team-a", "second"),
        "Conflict",
        ("True", "Conflict"),
        "the younger Edge in conflict",
    )
    .await;
    let (applied, why) = condition_of("team-a", "second", "ConfigApplied")
        .await
        .unwrap();
    assert_eq!((applied.as_str(), why.as_str()), ("False", "Conflict"));
    let events = cluster.get(&["events", "-n", "team-a"]).unwrap();
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| { e["involvedObject"]["name"] == "second" && e["reason"] == "Conflict" }),
        "a Conflict event on team-a/second: {events}"
    );
    for hub in [&a, &b] {
        let shared: Vec<_> = hub
            .edges()
            .await
            .into_iter()
            .filter(|e| e.id == "shared")
            .collect();
        assert_eq!(shared.len(), 1, "one entry per edge id");
        assert_eq!(shared[0].listen_ports, vec![8001], "the older Edge's");
    }
    let (status, _) = condition_of("team-b", "first", "Conflict").await.unwrap();
    assert_eq!(status, "False", "the owner is not in conflict");

    // Targets stay in the Edge's namespace.
    cluster.apply(&edge_yaml(
        "team-a",
        "peeker",
        "listenPorts: [9002], targetHosts: {\"9002\": db.team-b.svc}",
    ));
    wait_condition(
        &cluster,
        ("team-a", "peeker"),
        "ConfigApplied",
        ("False", "Invalid"),
        "a foreign target refused",
    )
    .await;
    assert_eq!(hub_generation(&a, "peeker").await, None);

    // A Secret named like an Edge's token Secret, but not made for it, is left alone.
    cluster.apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: github-token, namespace: team-a}\n\
         stringData: {token: not-yours}\n",
    );
    cluster.apply(&edge_yaml("team-a", "github", "listenPorts: [9003]"));
    wait_condition(
        &cluster,
        ("team-a", "github"),
        "Conflict",
        ("True", "Conflict"),
        "the token Secret conflict",
    )
    .await;
    let foreign = cluster
        .get(&["secret", "-n", "team-a", "github-token"])
        .unwrap();
    assert_eq!(foreign["data"]["token"], "bm90LXlvdXJz", "untouched");
    assert!(
        foreign["metadata"]["ownerReferences"].is_null(),
        "{foreign}"
    );
    assert!(
        hub_generation(&a, "github").await.is_some(),
        "the edge itself is served"
    );

    // A recreated Edge, and one whose status is lost, never go back to an older generation.
    cluster.apply(&edge_yaml("team-b", "phoenix", "listenPorts: [8002]"));
    let first_life = eventually_within(API_DEADLINE, "phoenix on the hubs", || async {
        hub_generation(&a, "phoenix").await
    })
    .await;
    cluster.kubectl(&["delete", "edge", "-n", "team-b", "phoenix"], None);
    // What the garbage collector does in a real cluster (this API server runs without one):
    // the Edge's own Secrets go with it.
    cluster.kubectl(
        &[
            "delete",
            "secret",
            "--ignore-not-found",
            "-n",
            "team-b",
            "phoenix-secret",
            "phoenix-token",
        ],
        None,
    );
    eventually_within(API_DEADLINE, "phoenix gone", || async {
        hub_generation(&a, "phoenix").await.is_none().then_some(())
    })
    .await;
    cluster.apply(&edge_yaml("team-b", "phoenix", "listenPorts: [8003]"));
    let second_life =
        eventually_within(API_DEADLINE, "phoenix back with its new ports", || async {
            let edge = a.edges().await.into_iter().find(|e| e.id == "phoenix")?;
            (edge.listen_ports == vec![8003]).then_some(edge.generation)
        })
        .await;
    assert!(second_life > first_life, "{second_life} > {first_life}");

    cluster.kubectl(
        &[
            "patch",
            "edge",
            "-n",
            "team-b",
            "phoenix",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"configGeneration":0,"configDigest":null}}"#,
        ],
        None,
    );
    cluster.apply(&edge_yaml("team-b", "phoenix", "listenPorts: [8004]"));
    eventually_within(
        API_DEADLINE,
        "phoenix's change reaches both hubs",
        || async {
            for hub in [&a, &b] {
                let edge = hub.edges().await.into_iter().find(|e| e.id == "phoenix")?;
                (edge.listen_ports == vec![8004] && edge.generation > second_life).then_some(())?;
            }
            Some(())
        },
    )
    .await;
}

/// Two operator replicas with leader election: one leads and serves, the other stands by and
/// takes over (within the lease's 15 s) when the leader dies without a word.
#[tokio::test]
async fn of_two_operator_replicas_one_leads_and_the_other_takes_over() {
    private_network(&["10.244.0.1"]);
    let cluster = Cluster::start();
    let operator_kubeconfig = cluster.operator_kubeconfig();
    let hub = Hub::start("hub-a", "10.244.0.1:18444".parse().unwrap(), true).await;
    cluster.apply(&hub_slice(&[&hub]));
    let elected = |identity: &str| {
        operator_as(
            &operator_kubeconfig,
            &["--hub-plaintext".into(), "--leader-election".into()],
            &[("POD_NAME", identity)],
        )
    };
    let holder = || {
        let lease = cluster.get(&["lease", "-n", HUB_NAMESPACE, "remoteingress-operator"]);
        lease.and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    let (first, first_metrics) = elected("operator-1");
    eventually_within(API_DEADLINE, "operator-1 to lead", || async {
        (holder()? == "operator-1").then_some(())
    })
    .await;
    let (mut second, second_metrics) = elected("operator-2");
    cluster.apply(&edge_yaml("default", "e1", "listenPorts: [8001]"));
    eventually_within(API_DEADLINE, "the leader to serve e1", || async {
        hub_generation(&hub, "e1").await.map(|_| ())
    })
    .await;
    assert_eq!(
        holder().as_deref(),
        Some("operator-1"),
        "operator-2 stands by"
    );

    // Both are ready (the leader's watches work; the other stands by); the metrics say who
    // leads, which hubs answer and how the Edges are.
    let sample = |metrics: SocketAddr, name: &'static str| async move {
        let (_, body) = http_get(metrics, "/metrics").await;
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    eventually_within(API_DEADLINE, "the leader's metrics", || async {
        let reachable = sample(
            first_metrics,
            "remoteingress_operator_hubs{state=\"reachable\"}",
        )
        .await?;
        let no_conflict = sample(
            first_metrics,
            "remoteingress_operator_edges{condition=\"Conflict\",status=\"False\"}",
        )
        .await?;
        (reachable == 1.0 && no_conflict == 1.0).then_some(())
    })
    .await;
    for (metrics, leading) in [(first_metrics, 1.0), (second_metrics, 0.0)] {
        assert_eq!(http_get(metrics, "/readyz").await.0, 200);
        assert_eq!(
            sample(metrics, "remoteingress_operator_leader").await,
            Some(leading)
        );
    }

    drop(first);
    eventually_within(API_DEADLINE, "operator-2 to take over", || async {
        (holder()? == "operator-2").then_some(())
    })
    .await;
    cluster.apply(&edge_yaml("default", "e2", "listenPorts: [8002]"));
    eventually_within(API_DEADLINE, "the new leader to serve e2", || async {
        hub_generation(&hub, "e2").await.map(|_| ())
    })
    .await;

    // A leader stopped cleanly gives the lease up as it exits, for a stand-by to take at once.
    let (_third, _) = elected("operator-3");
    let pid = second.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    eventually_within(API_DEADLINE, "operator-2 to exit", || {
        let exited = second.0.try_wait().unwrap().map(|_| ());
        async move { exited }
    })
    .await;
    assert_ne!(
        holder().as_deref(),
        Some("operator-2"),
        "released on the way out"
    );
    eventually_within(API_DEADLINE, "operator-3 to lead", || async {
        (holder()? == "operator-3").then_some(())
    })
    .await;
}

/// Requests the API server has served so far (`apiserver_request_total`), by verb and resource.
fn api_requests(cluster: &Cluster) -> BTreeMap<String, f64> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"], None);
    let mut counts = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map_or("", |v| v.trim_end_matches(['"', '}']))
                .to_owned()
        };
        let kind = format!(
            "{} {}/{}",
            label("verb"),
            label("resource"),
            label("subresource")
        );
        *counts.entry(kind).or_default() += count;
    }
    counts
}

/// The scale run of docs/kubernetes.md, by hand (`cargo test --test operator -- --ignored`):
/// 1,000 Edges and 500 LoadBalancer Services against a real API server and a hub; prints the
/// time from a Service change to the hub holding the edge's new port (p50, p99), the API
/// requests per minute at rest and the operator's memory. Figures, not assertions.
#[tokio::test]
#[ignore = "a measurement of a few minutes; run by hand"]
async fn scale_1000_edges_and_500_services() {
    const EDGES: usize = 1_000;
    const SERVICES: usize = 500;
    const CHANGES: usize = 40;
    private_network(&["10.244.0.1"]);
    let cluster = Cluster::start();
    let operator_kubeconfig = cluster.operator_kubeconfig();
    let hub = Hub::start("hub-a", "10.244.0.1:18444".parse().unwrap(), true).await;
    cluster.apply(&hub_slice(&[&hub]));
    let (operator, _) = operator_as(&operator_kubeconfig, &["--hub-plaintext".into()], &[]);
    cluster.kubectl(&["create", "namespace", "scale"], None);
    let window = std::time::Duration::from_secs(60);
    let requests_at_rest = || async {
        let before = api_requests(&cluster);
        tokio::time::sleep(window).await;
        let after = api_requests(&cluster);
        let by_kind: Vec<String> = after
            .iter()
            .filter_map(|(kind, n)| {
                let delta = n - before.get(kind).unwrap_or(&0.0);
                (delta > 0.0).then(|| format!("{kind}: {delta:.0}"))
            })
            .collect();
        println!("scale: requests at rest by kind: {}", by_kind.join("; "));
        after.values().sum::<f64>() - before.values().sum::<f64>()
    };
    let empty = requests_at_rest().await;
    println!(
        "scale: {empty:.0} API requests in {} s at rest with no Edge",
        window.as_secs()
    );
    let started = std::time::Instant::now();
    for batch in (0..EDGES).collect::<Vec<_>>().chunks(100) {
        let docs: Vec<String> = batch
            .iter()
            .map(|n| {
                edge_yaml(
                    "scale",
                    &format!("edge-{n}"),
                    &format!("listenPorts: [{}]", 20_000 + n),
                )
            })
            .collect();
        cluster.apply(&docs.join("---\n"));
    }
    let service = |n: usize, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{n}, namespace: scale, annotations: {{remoteingress.dev/edges: edge-{n}}}}}\n\
             spec: {{type: LoadBalancer, loadBalancerClass: {}, ports: [{{port: {port}, targetPort: 8080}}]}}\n",
            remoteingress_operator::LOAD_BALANCER_CLASS
        )
    };
    for batch in (0..SERVICES).collect::<Vec<_>>().chunks(100) {
        let docs: Vec<String> = batch.iter().map(|n| service(*n, 80)).collect();
        cluster.apply(&docs.join("---\n"));
    }
    let applied = started.elapsed();
    let port_on = |edges: &[remoteingress_controlplane::pb::EdgeInfo], n: usize, port: u32| {
        edges
            .iter()
            .any(|e| e.id == format!("edge-{n}") && e.listen_ports.contains(&port))
    };
    eventually_within(
        std::time::Duration::from_secs(600),
        "every edge and Service on the hub",
        || async {
            let edges = hub.edges().await;
            (edges.len() == EDGES && (0..SERVICES).all(|n| port_on(&edges, n, 80))).then_some(())
        },
    )
    .await;
    println!(
        "scale: {EDGES} Edges and {SERVICES} Services on the hub {:.1} s after the first \
         `kubectl apply` (the applies took {:.1} s)",
        started.elapsed().as_secs_f64(),
        applied.as_secs_f64()
    );

    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", operator.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    // At rest: once a quarter minute passes without the operator writing anything (the API
    // server's own endpoint and lease writes aside).
    let settling = std::time::Instant::now();
    loop {
        let before = api_requests(&cluster);
        tokio::time::sleep(std::time::Duration::from_secs(15)).await;
        let after = api_requests(&cluster);
        let writes: f64 = after
            .iter()
            .filter(|(kind, _)| !kind.starts_with("GET") && !kind.starts_with("WATCH"))
            .filter(|(kind, _)| !kind.contains("endpoints/") && !kind.contains("leases/"))
            .map(|(kind, n)| n - before.get(kind).unwrap_or(&0.0))
            .sum();
        if writes == 0.0 {
            break;
        }
        assert!(
            settling.elapsed() < std::time::Duration::from_secs(600),
            "the operator still writes after 10 minutes"
        );
    }
    println!(
        "scale: settled {:.1} s after all were on the hub",
        settling.elapsed().as_secs_f64()
    );
    let at_rest = requests_at_rest().await;
    println!(
        "scale: {at_rest:.0} API requests in {} s at rest; operator RSS {:.0} MiB",
        window.as_secs(),
        rss()
    );

    let mut delays = Vec::new();
    for n in 0..CHANGES {
        let changed = std::time::Instant::now();
        cluster.apply(&service(n, 81));
        eventually_within(API_DEADLINE, "the changed port on the hub", || async {
            port_on(&hub.edges().await, n, 81).then_some(())
        })
        .await;
        delays.push(changed.elapsed().as_secs_f64());
    }
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    println!(
        "scale: Service change to the hub holding the new port over {CHANGES} changes: p50 {:.2} s, p99 {:.2} s; operator RSS {:.0} MiB",
        at(0.5),
        at(0.99),
        rss()
    );
}
