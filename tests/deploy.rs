//! The deployment files: the Helm chart renders and is hardened and consistent with the binary's
//! defaults, the kustomize manifests render and match the chart, the systemd units verify, and
//! the command lines and environment they use bring a tunnel up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> PathBuf {
    let gopath = Command::new("go").args(["env", "GOPATH"]).output().ok();
    let gobin =
        gopath.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin"));
    ["/usr/local/bin", "/usr/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(gobin)
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{name} is not installed: ./scripts/test installs it"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The default of `--flag` in `remoteingress <command> --help`.
fn default_of(command: &str, flag: &str) -> String {
    let help = ok(Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args([command, "--help"])
        .output()
        .unwrap());
    let section = help.split(&format!("--{flag} ")).nth(1).unwrap();
    let default = section.split("[default: ").nth(1).unwrap();
    default.split(']').next().unwrap().to_owned()
}

fn port_of(address_or_port: &str) -> u64 {
    address_or_port.rsplit(':').next().unwrap().parse().unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
}

fn assert_hardened(workload: &Value) {
    for container in containers(workload) {
        let security = &container["securityContext"];
        assert_ne!(security["privileged"], true, "{container:?}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{container:?}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{container:?}");
        assert_eq!(security["capabilities"]["drop"][0], "ALL", "{container:?}");
    }
    assert_eq!(
        workload["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
}

#[test]
fn the_helm_chart_lints_renders_and_matches_the_binary() {
    let helm = tool("helm");
    let chart = "deploy/helm/remoteingress";
    ok(run(&helm, &["lint", chart, "--set", "adminToken.value=x"]));
    let refused = run(&helm, &["template", "t", chart]);
    assert!(!refused.status.success(), "a token is required");
    let yaml = ok(run(
        &helm,
        &[
            "template",
            "t",
            chart,
            "--set",
            "adminToken.value=x",
            "--set",
            "serviceMonitor.enabled=true",
            "--set-json",
            r#"edges=[{"id":"e1","secret":"s","listenPorts":[80]}]"#,
        ],
    ));
    let docs = documents(&yaml);
    let statefulset = kind(&docs, "StatefulSet")[0];
    assert_hardened(statefulset);
    let pod = &statefulset["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let hub = &containers(statefulset)[0];

    let port = |name: &str| -> u64 {
        hub["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap()
    };
    assert_eq!(
        port("tunnel"),
        default_of("hub", "tunnel-port").parse::<u64>().unwrap()
    );
    assert_eq!(port("tunnel-udp"), port("tunnel"));
    assert_eq!(port("admin"), port_of(&default_of("hub", "admin-addr")));
    assert_eq!(port("metrics"), port_of(&default_of("hub", "metrics-addr")));
    assert_eq!(hub["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(hub["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(hub["readinessProbe"]["httpGet"]["port"], "metrics");

    // Every environment variable is one the binary reads, and every Secret reference resolves.
    let hub_help = ok(Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args(["hub", "--help"])
        .output()
        .unwrap());
    let secrets: Vec<&Value> = kind(&docs, "Secret");
    for env in hub["env"].as_sequence().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            hub_help.contains(name) || name == "REMOTEINGRESS_ADMIN_TOKEN",
            "{name} is not a hub setting"
        );
        if let Some(reference) = env["valueFrom"]["secretKeyRef"].as_mapping() {
            let (secret, key) = (
                &reference[&Value::from("name")],
                &reference[&Value::from("key")],
            );
            let found = secrets.iter().any(|s| {
                &s["metadata"]["name"] == secret
                    && !s["stringData"][key.as_str().unwrap()].is_null()
            });
            assert!(found, "secret {secret:?} with key {key:?} is not rendered");
        }
    }
    assert!(
        kind(&docs, "ConfigMap").is_empty(),
        "edge secrets stay in Secrets"
    );
    let edges = kind(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "t-remoteingress-edges")
        .expect("the edges file's Secret");
    assert!(edges["stringData"]["edges.json"]
        .as_str()
        .unwrap()
        .contains("\"e1\""));

    let tunnel = kind(&docs, "Service")
        .into_iter()
        .find(|s| s["spec"]["type"] == "LoadBalancer")
        .unwrap();
    let protocols: Vec<&str> = tunnel["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["TCP", "UDP"]);
    assert_eq!(kind(&docs, "NetworkPolicy").len(), 1);
    assert_eq!(statefulset["spec"]["replicas"], 2, "two hubs by default");
    assert_eq!(kind(&docs, "PodDisruptionBudget").len(), 1);
    let tunnel_tls = kind(&docs, "Secret")
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .expect("one tunnel certificate for every replica");
    assert!(tunnel_tls["data"]["tls.crt"].is_string());
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace
            > default_of("hub", "shutdown-grace-secs")
                .parse::<u64>()
                .unwrap()
    );
    assert_eq!(kind(&docs, "ServiceMonitor").len(), 1);
}

#[test]
fn the_chart_runs_the_operator_against_its_own_hubs_with_settings_the_binary_reads() {
    let helm = tool("helm");
    let render = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "t",
            "deploy/helm/remoteingress",
            "--set",
            "adminToken.value=x",
        ];
        args.extend(["--set", "operator.enabled=true"]);
        args.extend(extra);
        documents(&ok(run(&helm, &args)))
    };
    let docs = render(&[]);
    let deployment = kind(&docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "t-remoteingress-operator")
        .expect("the operator Deployment");
    assert_hardened(deployment);
    assert_eq!(deployment["spec"]["replicas"], 2, "a leader and a stand-by");
    let operator = &containers(deployment)[0];
    assert_eq!(operator["args"][0], "operator");
    let help = ok(Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args(["operator", "--help"])
        .output()
        .unwrap());
    let env = operator["env"].as_sequence().unwrap();
    for variable in env {
        let name = variable["name"].as_str().unwrap();
        assert!(
            help.contains(name)
                || ["POD_NAME", "POD_NAMESPACE", "REMOTEINGRESS_LOG_FORMAT"].contains(&name),
            "{name} is not an operator setting"
        );
    }
    // It reaches the hubs over TLS, verified with the CA of the hubs' admin certificate.
    let setting = |name: &str| {
        env.iter()
            .find(|v| v["name"] == name)
            .map(|v| v["value"].clone())
    };
    assert_eq!(
        setting("REMOTEINGRESS_HUB_CA_FILE").unwrap(),
        "/etc/remoteingress/hub-ca/ca.crt"
    );
    assert!(setting("REMOTEINGRESS_HUB_PLAINTEXT").is_none());
    assert_eq!(setting("REMOTEINGRESS_LEADER_ELECTION").unwrap(), "true");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(operator[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let admin_tls = kind(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "t-remoteingress-admin-tls")
        .expect("the admin TLS Secret");
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(admin_tls["data"][key].is_string(), "{key}");
    }
    let hub = kind(&docs, "StatefulSet")[0];
    assert!(containers(hub)[0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "REMOTEINGRESS_ADMIN_TLS_CERT"));
    // It finds the hubs through the admin Service, whose port it names.
    let hub_service = env
        .iter()
        .find(|v| v["name"] == "REMOTEINGRESS_HUB_SERVICE")
        .map(|v| v["value"].clone())
        .unwrap();
    let admin = kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == hub_service)
        .expect("the operator's hub Service is rendered");
    assert!(admin["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"] == default_of("operator", "hub-admin-port-name").as_str()));
    // No hub Service selects the operator's pod.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for service in kind(&docs, "Service") {
        let selector = service["spec"]["selector"].as_mapping().unwrap();
        assert!(
            selector.iter().any(|(k, v)| &labels[k] != v),
            "{:?} selects the operator",
            service["metadata"]["name"]
        );
    }
    // All namespaces: a ClusterRole; one namespace: a Role there.
    assert_eq!(kind(&docs, "ClusterRole").len(), 1);
    let scoped = render(&["--set", "operator.watchNamespace=apps"]);
    assert!(kind(&scoped, "ClusterRole").is_empty());
    assert!(kind(&scoped, "Role")
        .iter()
        .any(|r| r["metadata"]["namespace"] == "apps"));
    // The CRD ships with the chart.
    let crd = std::fs::read_to_string(
        repo().join("deploy/helm/remoteingress/crds/edges.remoteingress.dev.yaml"),
    )
    .unwrap();
    assert!(crd.contains("kind: CustomResourceDefinition"));
}

#[test]
fn the_kustomize_manifests_render_and_match_the_chart() {
    let kubectl = tool("kubectl");
    let hub = documents(&ok(run(&kubectl, &["kustomize", "deploy/kubernetes"])));
    assert_hardened(kind(&hub, "StatefulSet")[0]);
    let edge = documents(&ok(run(&kubectl, &["kustomize", "deploy/kubernetes/edge"])));
    let daemonset = kind(&edge, "DaemonSet")[0];
    let security = &containers(daemonset)[0]["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(
        security["capabilities"]["add"],
        serde_yaml::from_str::<Value>("[NET_ADMIN, NET_BIND_SERVICE]").unwrap()
    );
    let env: BTreeMap<&str, &Value> = containers(daemonset)[0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert!(env["REMOTEINGRESS_TOKEN"]["valueFrom"]["secretKeyRef"].is_mapping());
    // On the host network, anything not on loopback is on the node's public address.
    let metrics: SocketAddr = env["REMOTEINGRESS_METRICS_ADDR"]["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(metrics.ip().is_loopback(), "edge metrics on {metrics}");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            containers(daemonset)[0][probe]["httpGet"]["host"],
            "127.0.0.1"
        );
    }

    // The committed base is exactly what the chart renders.
    let committed =
        std::fs::read_to_string(repo().join("deploy/kubernetes/hub/remoteingress.yaml")).unwrap();
    let helm = tool("helm");
    let rendered = ok(run(
        &helm,
        &[
            "template",
            "remoteingress",
            "deploy/helm/remoteingress",
            "--namespace",
            "remoteingress",
            "--set",
            "adminToken.existingSecret=remoteingress-admin",
            "--set",
            "tunnelTls.secretName=remoteingress-tunnel-tls",
            "--set",
            "adminTls.secretName=remoteingress-admin-tls",
        ],
    ));
    assert!(
        committed == rendered,
        "deploy/kubernetes is stale: run scripts/render-manifests"
    );
}

/// `KEY=value` lines of a unit's Environment= entries and of an environment file.
fn environment(unit: &str, env_file: &Path) -> Vec<(String, String)> {
    let file = std::fs::read_to_string(env_file).unwrap();
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .chain(
            file.lines()
                .filter(|l| !l.starts_with('#') && l.contains('=')),
        )
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn exec_args(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    line.split_whitespace().skip(1).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_verify_and_their_command_lines_bring_a_tunnel_up() {
    let systemd = repo().join("deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["remoteingress-hub.service", "remoteingress-edge.service"] {
        let unit = std::fs::read_to_string(systemd.join(name)).unwrap();
        // Point at the binary under test and tolerate the absent /etc files.
        let local = unit
            .replace(
                "/usr/local/bin/remoteingress",
                env!("CARGO_BIN_EXE_remoteingress"),
            )
            .replace("EnvironmentFile=/", "EnvironmentFile=-/");
        let path = dir.path().join(name);
        std::fs::write(&path, local).unwrap();
        units.push((unit, path));
    }
    let verify = Command::new(tool("systemd-analyze"))
        .arg("verify")
        .args(units.iter().map(|(_, path)| path))
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
    let (hub_unit, edge_unit) = (&units[0].0, &units[1].0);
    assert!(edge_unit.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE"));
    assert!(hub_unit.contains("StateDirectory=remoteingress"));

    // The units' command lines and environment, with ports and paths this test may use.
    let localhost = "127.0.0.1".parse().unwrap();
    let (tunnel, hub_metrics, edge_metrics) = (
        free_port(localhost),
        free_port(localhost),
        free_port(localhost),
    );
    let state = dir.path().join("state");
    let target = echo_target().await;
    let edge_port = free_port(EDGE_IP);
    let edges_file = dir.path().join("edges.json");
    std::fs::write(
        &edges_file,
        serde_json::to_string(&vec![allowed("e1", &[(edge_port, target.addr.port())])]).unwrap(),
    )
    .unwrap();
    let mut hub_env = environment(hub_unit, &systemd.join("hub.env.example"));
    hub_env.extend([
        (
            "REMOTEINGRESS_STATE_DIR".into(),
            state.display().to_string(),
        ),
        ("REMOTEINGRESS_LISTEN_ADDRESS".into(), "127.0.0.1".into()),
        ("REMOTEINGRESS_TUNNEL_PORT".into(), tunnel.to_string()),
        (
            "REMOTEINGRESS_ADMIN_ADDR".into(),
            format!("127.0.0.1:{}", free_port(localhost)),
        ),
        (
            "REMOTEINGRESS_METRICS_ADDR".into(),
            format!("127.0.0.1:{hub_metrics}"),
        ),
        (
            "REMOTEINGRESS_EDGES_FILE".into(),
            edges_file.display().to_string(),
        ),
    ]);
    let env_refs = |env: &[(String, String)]| -> Vec<(String, String)> { env.to_vec() };
    let _hub = Process(
        Command::new(env!("CARGO_BIN_EXE_remoteingress"))
            .args(exec_args(hub_unit))
            .envs(env_refs(&hub_env))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(hub_metrics).await;
    let pin = remoteingress_tunnel::HubIdentity::load_or_generate(&state)
        .unwrap()
        .pin();
    let token = remoteingress_wire::token::ConnectionToken {
        hub_host: "127.0.0.1".into(),
        hub_port: tunnel,
        edge_id: "e1".into(),
        secret: SECRET.into(),
        pin: Some(pin),
        hubs: Vec::new(),
    }
    .encode();
    let mut edge_env = environment(edge_unit, &systemd.join("edge.env.example"));
    edge_env.extend([
        ("REMOTEINGRESS_TOKEN".into(), token),
        ("REMOTEINGRESS_BIND_ADDRESS".into(), EDGE_IP.to_string()),
        (
            "REMOTEINGRESS_METRICS_ADDR".into(),
            format!("127.0.0.1:{edge_metrics}"),
        ),
        (
            "REMOTEINGRESS_STATUS_ADDR".into(),
            format!("127.0.0.1:{}", free_port(localhost)),
        ),
        // Tests never touch the host's nftables nor the internet.
        ("REMOTEINGRESS_FIREWALL".into(), "off".into()),
        ("REMOTEINGRESS_NO_STUN".into(), "true".into()),
    ]);
    let _edge = Process(
        Command::new(env!("CARGO_BIN_EXE_remoteingress"))
            .args(exec_args(edge_unit))
            .envs(env_refs(&edge_env))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], edge_metrics));
    eventually("the edge's tunnel to come up", || async {
        match tokio::net::TcpStream::connect(metrics).await {
            Ok(_) => (http_get(metrics, "/readyz").await.0 == 200).then_some(()),
            Err(_) => None,
        }
    })
    .await;
    let data = pattern(2000, 11);
    eventually("the edge port", || async {
        tokio::net::TcpStream::connect((EDGE_IP, edge_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert_eq!(
        round_trip(std::net::SocketAddr::new(EDGE_IP, edge_port), &data).await,
        data
    );
}
