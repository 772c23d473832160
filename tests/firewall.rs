//! The edge firewall against real nftables, always inside a private network namespace this test
//! creates (`unshare -rn`), never against the host's rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::*;
use remoteingress_edge::{Edge, Firewall, FirewallMode, FirewallState};
use remoteingress_wire::{EdgeConfig, FirewallConfig};

/// A private network namespace, held open by a sleeping process.
struct Netns {
    holder: Process,
}

impl Netns {
    async fn new() -> Self {
        let holder = namespace_holder("-rn").await;
        let netns = Self { holder };
        // `unshare -r` maps our user into the namespace only after creating it: until then
        // entering it fails, so the first command is retried.
        eventually("the namespace to take commands", || {
            let up = netns
                .run(&["ip", "link", "set", "lo", "up"])
                .status
                .success();
            async move { up.then_some(()) }
        })
        .await;
        for args in [
            &["ip", "addr", "add", "10.1.0.1/32", "dev", "lo"][..],
            &["ip", "addr", "add", "10.2.0.1/32", "dev", "lo"],
        ] {
            assert!(netns.run(args).status.success(), "{args:?}");
        }
        netns
    }

    /// The prefix that runs a command inside the namespace.
    fn prefix(&self) -> Vec<String> {
        let pid = self.holder.0.id().to_string();
        ["nsenter", "-t", &pid, "-U", "-n", "--preserve-credentials"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn nft_command(&self) -> Vec<String> {
        let mut command = self.prefix();
        command.push("nft".into());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        let prefix = self.prefix();
        Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(args)
            .output()
            .unwrap()
    }

    /// `nft -j list table inet remoteingress`, or `None` if the table does not exist.
    fn table(&self) -> Option<String> {
        let output = self.run(&["nft", "-j", "list", "table", "inet", "remoteingress"]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// UDP datagrams received on 127.0.0.1:`port` when each source sends `count`.
    fn delivered(&self, port: u16, count: usize, sources: &[&str]) -> serde_json::Value {
        let port = port.to_string();
        let count = count.to_string();
        let mut args = vec!["python3", "-c", COUNT_SCRIPT, &port, &count];
        args.extend_from_slice(sources);
        let output = self.run(&args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// Sends `n` datagrams from each source address and counts what arrives.
const COUNT_SCRIPT: &str = r#"
import json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", port))
rx.settimeout(0.3)
result = {}
for src in sys.argv[3:]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((src, 0))
    for _ in range(n):
        tx.sendto(b"x", ("127.0.0.1", port))
    got = 0
    try:
        while True:
            rx.recv(64)
            got += 1
    except socket.timeout:
        pass
    result[src] = got
print(json.dumps(result))
"#;

fn config(json: &str) -> FirewallConfig {
    serde_json::from_str(json).unwrap()
}

fn edge_config(json: &str) -> EdgeConfig {
    serde_json::from_str(json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_apply_whole_replace_whole_and_leave_nothing_behind() {
    let netns = Netns::new().await;
    let firewall = Firewall::new(netns.nft_command());
    firewall.probe().await.unwrap();

    let first = edge_config(
        r#"{"listenPortsUdp":[9999,9998],"firewallConfig":{"blockedIps":["10.1.0.1","2001:db8::/32"],
            "rateLimits":[{"id":"udp-flood","port":9998,"protocol":"udp","rate":"1/second","burst":3,"perSourceIP":true}],
            "rules":[{"id":"office","direction":"input","action":"accept","sourceIP":"10.0.0.0/24","destPort":9999,"protocol":"udp","comment":"monitoring"}]}}"#,
    );
    assert_eq!(firewall.apply(&first).await.unwrap(), 5);
    let listed = netns.table().expect("the table exists");
    for needle in [
        "\"10.1.0.1\"",
        "\"2001:db8::\"",
        "\"rl0_udp_v4\"",
        "\"monitoring\"",
    ] {
        assert!(listed.contains(needle), "{needle} missing in {listed}");
    }
    assert!(
        !listed.contains("\"output\"") && !listed.contains("\"forward\""),
        "only the input path is hooked: {listed}"
    );

    // Real traffic: the blocked source is dropped, the other passes.
    let blocked = netns.delivered(9999, 10, &["10.1.0.1", "10.2.0.1"]);
    assert_eq!(blocked["10.1.0.1"], 0, "{blocked}");
    assert_eq!(blocked["10.2.0.1"], 10, "{blocked}");
    // The same source still reaches the host's other ports: the hub's rules are the edge's.
    let elsewhere = netns.delivered(9997, 10, &["10.1.0.1"]);
    assert_eq!(elsewhere["10.1.0.1"], 10, "{elsewhere}");
    // Per-source rate limit: each source gets about the burst, independently of the other.
    let limited = netns.delivered(9998, 30, &["10.2.0.1", "127.0.0.1"]);
    for source in ["10.2.0.1", "127.0.0.1"] {
        let got = limited[source].as_u64().unwrap();
        assert!((1..=6).contains(&got), "{source} got {got}: {limited}");
    }

    // Replacing the config removes the old rules whole.
    let second = edge_config(
        r#"{"listenPorts":[8080],"firewallConfig":{"rules":[{"id":"web","direction":"input","action":"drop","destPort":8080,"protocol":"tcp"}]}}"#,
    );
    assert_eq!(firewall.apply(&second).await.unwrap(), 1);
    let listed = netns.table().unwrap();
    assert!(
        !listed.contains("10.1.0.1") && !listed.contains("rl0_v4"),
        "{listed}"
    );
    assert_eq!(netns.delivered(9999, 10, &["10.1.0.1"])["10.1.0.1"], 10);

    // A config that is not valid changes nothing, and says why: a bad address, or a rule
    // that would reach beyond the edge's input path and ports.
    for (broken, field) in [
        (
            r#"{"listenPortsUdp":[9999],"firewallConfig":{"blockedIps":["10.3.0.1","not-an-address"]}}"#,
            "firewallConfig.blockedIps[1]",
        ),
        (
            r#"{"listenPorts":[8080],"firewallConfig":{"rules":[{"id":"out","direction":"output","action":"drop","destPort":8080,"protocol":"tcp"}]}}"#,
            "firewallConfig.rules[0].direction",
        ),
        (
            r#"{"listenPorts":[8080],"firewallConfig":{"rules":[{"id":"ssh","direction":"input","action":"drop","destPort":22,"protocol":"tcp"}]}}"#,
            "firewallConfig.rules[0].destPort",
        ),
    ] {
        let error = firewall
            .apply(&edge_config(broken))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{field}: {error}");
        assert_eq!(
            netns.table().unwrap(),
            listed,
            "the previous rules stay in force"
        );
    }

    firewall.remove().await.unwrap();
    assert_eq!(netns.table(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_applies_what_the_hub_pushes_and_cleans_up_on_stop() {
    let netns = Netns::new().await;
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    let mut entry = allowed("e1", &[(setup.edge_port, setup.target.addr.port())]);
    entry.config.firewall_config = Some(config(r#"{"blockedIps":["10.1.0.1"]}"#));
    setup.hub.upsert_edge(entry.clone()).await.unwrap();

    let mut options = edge_options(&setup.hub, "e1", SECRET);
    options.firewall = FirewallMode::Required;
    options.nft_command = netns.nft_command();
    let edge = Edge::start(options).await.unwrap();
    eventually("the firewall to be applied", || async {
        (edge.status().firewall == Some(FirewallState::Applied(1))).then_some(())
    })
    .await;
    assert!(netns.table().unwrap().contains("10.1.0.1"));

    entry.config.firewall_config = Some(config(r#"{"blockedIps":["10.2.0.0/16","10.4.0.0/16"]}"#));
    setup.hub.upsert_edge(entry).await.unwrap();
    eventually("the new rules", || async {
        netns
            .table()
            .filter(|t| t.contains("10.4.0.0") && !t.contains("10.1.0.1"))
    })
    .await;
    let data = pattern(1000, 9);
    assert_eq!(
        round_trip(setup.edge_addr(), &data).await,
        data,
        "tunnelling continues"
    );

    edge.shutdown().await;
    assert_eq!(netns.table(), None, "stopping the edge removes its table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nftables_the_edge_warns_and_tunnels_on() {
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    let mut options = edge_options(&setup.hub, "e1", SECRET);
    options.firewall = FirewallMode::Auto;
    options.nft_command = vec!["/nonexistent/nft".into()];
    let edge = Edge::start(options.clone()).await.unwrap();
    assert!(matches!(
        edge.status().firewall,
        Some(FirewallState::Unavailable(_))
    ));
    wait_listening(&edge, setup.edge_port).await;
    let data = pattern(1000, 2);
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);
    edge.shutdown().await;

    options.firewall = FirewallMode::Required;
    let error = Edge::start(options).await.unwrap_err().to_string();
    assert!(error.contains("firewall is required"), "{error}");
}

/// An original hub accepts rules beyond the edge's ports (its README's own example allows SSH):
/// the edge leaves those out and applies the rest of the configuration, its ports included,
/// instead of refusing all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_hubs_rules_beyond_the_edges_ports_are_left_out_and_the_rest_applies() {
    use tokio::io::AsyncWriteExt;
    let netns = Netns::new().await;
    let state = tempfile::tempdir().unwrap();
    let identity = remoteingress_tunnel::HubIdentity::load_or_generate(state.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_port = listener.local_addr().unwrap().port();
    let edge_port = free_port(EDGE_IP);
    let config = format!(
        r#"{{"listenPorts":[{edge_port}],"firewallConfig":{{"blockedIps":["10.1.0.1"],
            "rules":[{{"id":"allow-ssh","direction":"input","action":"accept","sourceIP":"10.0.0.0/24","destPort":22,"protocol":"tcp"}},
                     {{"id":"out","direction":"output","action":"drop"}}]}}}}"#
    )
    .replace(['\n', ' '], "");
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config().unwrap());
    let hub = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        remoteingress_tunnel::line::read_line(&mut tls, 4096)
            .await
            .unwrap();
        tls.write_all(format!("{config}\n").as_bytes())
            .await
            .unwrap();
        // Held open while the edge applies it.
        std::future::pending::<()>().await;
    });

    let mut options = remoteingress_edge::EdgeOptions::new(
        "127.0.0.1",
        hub_port,
        "e1",
        SECRET,
        remoteingress_tunnel::HubTrust::Pin(identity.pin()),
    );
    options.bind_address = EDGE_IP;
    options.stun_servers.clear();
    options.firewall = FirewallMode::Required;
    options.nft_command = netns.nft_command();
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, edge_port).await;
    eventually("the firewall to be applied", || async {
        (edge.status().firewall == Some(FirewallState::Applied(1))).then_some(())
    })
    .await;
    let listed = netns.table().unwrap();
    assert!(
        listed.contains("10.1.0.1") && !listed.contains("10.0.0.0"),
        "{listed}"
    );
    edge.shutdown().await;
    hub.abort();
}
