//! The container image, built by `scripts/image` and run under podman the way the chart runs it:
//! the hub as 65532 and the edge as root with only NET_ADMIN and NET_BIND_SERVICE, both with a
//! read-only root filesystem and every other capability dropped, in a network namespace this
//! test creates (never the host's). podman keeps its storage in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{eventually, namespace_holder, Process};
use remoteingress_tunnel::HubIdentity;
use remoteingress_wire::token::ConnectionToken;

/// The image archive, built once per run from the binary under test.
fn image_archive() -> &'static PathBuf {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let output = Command::new(root.join("scripts/image"))
            .arg(format!("--binary={}", env!("CARGO_BIN_EXE_remoteingress")))
            .output()
            .expect("scripts/image runs (buildah: ./scripts/test installs it)");
        assert!(output.status.success(), "scripts/image: {output:?}");
        let version = env!("CARGO_PKG_VERSION");
        root.join(format!("target/image/remoteingress-{version}.oci.tar"))
    })
}

/// podman with storage of its own, the image loaded.
struct Podman {
    dir: tempfile::TempDir,
    image: String,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let podman = Self {
            dir,
            image: format!("localhost/remoteingress:{}", env!("CARGO_PKG_VERSION")),
        };
        let archive = image_archive().display().to_string();
        podman.ok(&["load", "--quiet", "--input", &archive]);
        podman
    }

    /// `podman` with this storage. runc, not crun: crun refuses this machine's hybrid cgroup
    /// layout.
    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .arg(format!(
                "--root={}",
                self.dir.path().join("storage").display()
            ))
            .arg(format!(
                "--runroot={}",
                self.dir.path().join("run").display()
            ))
            .args(["--storage-driver=vfs", "--runtime=/usr/sbin/runc"]);
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("podman runs")
    }

    /// Runs a podman command that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(output.status.success(), "podman {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Starts a container of the image in `netns` with `security` options and the binary's
    /// `args`; its name.
    fn start(&self, name: &str, netns: &Netns, security: &[&str], args: &[&str]) -> String {
        let network = format!("--network=ns:/proc/{}/ns/net", netns.pid());
        let mut run = vec![
            "run",
            "--detach",
            "--name",
            name,
            &network,
            // The machine's hard limit is below podman's defaults.
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
            "--read-only",
            "--security-opt=no-new-privileges",
            "--cap-drop=ALL",
        ];
        run.extend_from_slice(security);
        run.push(&self.image);
        run.extend_from_slice(args);
        self.ok(&run);
        name.to_owned()
    }

    fn logs(&self, name: &str) -> String {
        let output = self.output(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.output(&["rm", "--force", "--all", "--time=0"]);
    }
}

/// A network namespace of the test's own, held open by a sleeping process.
struct Netns {
    holder: Process,
}

impl Netns {
    async fn new() -> Self {
        let holder = namespace_holder("--net").await;
        let netns = Self { holder };
        assert!(netns
            .run(&["ip", "link", "set", "lo", "up"])
            .status
            .success());
        netns
    }

    fn pid(&self) -> u32 {
        self.holder.0.id()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid().to_string(), "-n", "--"])
            .args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Whether `http://addr/path` answers 200 inside the namespace.
    fn http_ok(&self, addr: &str, path: &str) -> bool {
        self.run(&[
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            &format!("http://{addr}{path}"),
        ])
        .status
        .success()
    }

    /// Connects from 127.0.0.3 to `addr`, sends a line and returns the reply ("" if none).
    fn request(&self, addr: (&str, u16)) -> String {
        let script = format!(
            "import socket\n\
             s = socket.create_connection(('{}', {}), timeout=5, source_address=('127.0.0.3', 0))\n\
             s.sendall(b'hello\\r\\n')\n\
             print(s.makefile('rb').readline().decode().strip())\n",
            addr.0, addr.1
        );
        let output = self.run(&["python3", "-c", &script]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A target on 127.0.0.1:`port` that answers each connection, once the client's line has
    /// come too, with the first line it got: the PROXY line.
    fn proxy_line_target(&self, port: u16) -> Process {
        let script = format!(
            "import socket, threading\n\
             def serve(conn):\n\
             \x20   lines = conn.makefile('rb')\n\
             \x20   proxy = lines.readline()\n\
             \x20   lines.readline()\n\
             \x20   conn.sendall(proxy)\n\
             \x20   conn.close()\n\
             server = socket.create_server(('127.0.0.1', {port}))\n\
             while True:\n\
             \x20   conn, _ = server.accept()\n\
             \x20   threading.Thread(target=serve, args=(conn,)).start()\n"
        );
        Process(
            self.command(&["python3", "-c", &script])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// A connection from 127.0.0.3 to `addr` held open, its line sent only once the file `go`
    /// exists; the reply goes to the file `reply`.
    fn held_request(&self, addr: (&str, u16), go: &Path, reply: &Path) -> Process {
        let script = format!(
            "import os, socket, time\n\
             s = socket.create_connection(('{}', {}), timeout=60, source_address=('127.0.0.3', 0))\n\
             while not os.path.exists('{}'):\n\
             \x20   time.sleep(0.05)\n\
             s.sendall(b'late\\r\\n')\n\
             open('{}', 'w').write(s.makefile('rb').readline().decode())\n",
            addr.0,
            addr.1,
            go.display(),
            reply.display()
        );
        Process(
            self.command(&["python3", "-c", &script])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// A sample of the metrics served on `addr` inside the namespace, if present.
    fn metric(&self, addr: &str, sample: &str) -> Option<f64> {
        let output = self.run(&["curl", "-sf", &format!("http://{addr}/metrics")]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
    }
}

const TUNNEL_PORT: u16 = 8443;
const PUBLIC_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const HUB_METRICS: &str = "127.0.0.1:9464";
const EDGE_METRICS: &str = "127.0.0.1:9470";
const SECRET: &str = "container-test-secret";

/// The hub as the chart runs it: 65532, its state on a volume, an edges file mounted read-only.
fn start_hub(podman: &Podman, netns: &Netns, state: &Path, edges: &Path) -> String {
    let state = format!("--volume={}:/var/lib/remoteingress", state.display());
    let edges = format!(
        "--volume={}:/etc/remoteingress/edges.json:ro",
        edges.display()
    );
    let tunnel = format!("--tunnel-port={TUNNEL_PORT}");
    let metrics = format!("--metrics-addr={HUB_METRICS}");
    podman.start(
        "hub",
        netns,
        &["--user=65532:65532", &state, &edges],
        &[
            "hub",
            &tunnel,
            "--state-dir=/var/lib/remoteingress",
            "--edges-file=/etc/remoteingress/edges.json",
            "--target-host=127.0.0.1",
            &metrics,
            "--shutdown-grace-secs=5",
        ],
    )
}

/// The pin of the certificate the hub keeps in `state`, once it is there.
async fn hub_pin(state: &Path) -> String {
    eventually("the hub's certificate in its state volume", || {
        let pin = state
            .join("hub-cert.pem")
            .exists()
            .then(|| HubIdentity::load_or_generate(state).ok().map(|i| i.pin()))
            .flatten();
        async move { pin }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_edge_run_from_the_image_as_the_chart_runs_them() {
    let podman = Podman::new();
    let netns = Netns::new().await;
    let _target = netns.proxy_line_target(TARGET_PORT);

    let state = tempfile::tempdir().unwrap();
    let owner = Command::new("chown")
        .args(["65532:65532", &state.path().display().to_string()])
        .status()
        .unwrap();
    assert!(owner.success());
    let edges_dir = tempfile::tempdir().unwrap();
    let edges = edges_dir.path().join("edges.json");
    std::fs::write(
        &edges,
        serde_json::json!([{
            "id": "e1",
            "secret": SECRET,
            "listenPorts": [PUBLIC_PORT],
            "targetPorts": {PUBLIC_PORT.to_string(): TARGET_PORT},
            "firewallConfig": {"blockedIps": ["127.0.0.9"]},
        }])
        .to_string(),
    )
    .unwrap();

    let hub = start_hub(&podman, &netns, state.path(), &edges);
    eventually("the hub container ready", || {
        let ready = netns.http_ok(HUB_METRICS, "/readyz");
        async move { ready.then_some(()) }
    })
    .await;
    let pin = hub_pin(state.path()).await;

    let token = ConnectionToken {
        hub_host: "127.0.0.1".into(),
        hub_port: TUNNEL_PORT,
        edge_id: "e1".into(),
        secret: SECRET.into(),
        pin: Some(pin.clone()),
        hubs: Vec::new(),
    }
    .encode();
    let token = format!("--env=REMOTEINGRESS_TOKEN={token}");
    let metrics = format!("--metrics-addr={EDGE_METRICS}");
    let edge = podman.start(
        "edge",
        &netns,
        &["--user=0:0", "--cap-add=NET_ADMIN,NET_BIND_SERVICE", &token],
        &[
            "edge",
            "--bind-address=127.0.0.2",
            "--firewall=required",
            "--no-stun",
            &metrics,
            "--reconnect-min-ms=50",
            "--reconnect-max-secs=1",
        ],
    );

    // A request through the edge reaches the target with the client's address in the PROXY line.
    let line = eventually("a request through the edge", || {
        let line = netns.request(("127.0.0.2", PUBLIC_PORT));
        async move { (!line.is_empty()).then_some(line) }
    })
    .await;
    let fields: Vec<&str> = line.split(' ').collect();
    assert!(
        matches!(
            fields[..],
            ["PROXY", "TCP4", "127.0.0.3", "127.0.0.2", client_port, public_port]
                if client_port.parse::<u16>().is_ok() && public_port == PUBLIC_PORT.to_string()
        ),
        "{line}\n{}",
        podman.logs(&edge)
    );
    // The pushed firewall is applied by the edge, in its namespace.
    let table = netns.run(&["nft", "list", "table", "inet", "remoteingress"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("127.0.0.9"),
        "{table}\n{}",
        podman.logs(&edge)
    );

    // The hub's state survives a restart of its container: same certificate, the edge is back.
    podman.ok(&["restart", "--time=10", &hub]);
    assert_eq!(hub_pin(state.path()).await, pin, "the identity is kept");
    eventually("a request through the edge after the hub restarted", || {
        let line = netns.request(("127.0.0.2", PUBLIC_PORT));
        async move { line.starts_with("PROXY TCP4 127.0.0.3 ").then_some(()) }
    })
    .await;

    // SIGTERM drains the edge as on the host: new connections are refused, an open one
    // finishes, then it exits with success. Then the hub.
    let files = tempfile::tempdir().unwrap();
    let (go, reply) = (files.path().join("go"), files.path().join("reply"));
    let _held = netns.held_request(("127.0.0.2", PUBLIC_PORT), &go, &reply);
    eventually("the held connection through the tunnel", || {
        let open = netns.metric(EDGE_METRICS, "remoteingress_streams_active");
        async move { (open == Some(1.0)).then_some(()) }
    })
    .await;
    podman.ok(&["kill", "--signal=TERM", &edge]);
    eventually("new connections refused while the edge drains", || {
        let refused = netns.request(("127.0.0.2", PUBLIC_PORT)).is_empty();
        async move { refused.then_some(()) }
    })
    .await;
    std::fs::write(&go, "").unwrap();
    let line = eventually("the held connection's reply", || {
        let line = std::fs::read_to_string(&reply).unwrap_or_default();
        async move { (!line.is_empty()).then_some(line) }
    })
    .await;
    assert!(
        line.starts_with("PROXY TCP4 127.0.0.3 127.0.0.2 "),
        "the open connection finished through the draining edge: {line}"
    );
    for name in [&edge, &hub] {
        if *name == hub {
            podman.ok(&["kill", "--signal=TERM", name]);
        }
        let code = podman.ok(&["wait", name]);
        assert_eq!(code, "0", "{name} exit code\n{}", podman.logs(name));
    }
    let hub_logs = podman.logs(&hub);
    assert!(hub_logs.contains("shutting down"), "{hub_logs}");
}
