//! The gRPC control plane against a real hub and edge, through a tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use remoteingress_controlplane::pb;
use remoteingress_controlplane::pb::edge_status_client::EdgeStatusClient;
use remoteingress_controlplane::pb::hub_admin_client::HubAdminClient;
use remoteingress_controlplane::{serve_edge_status, serve_hub_admin, AdminOptions, ApiLimits};
use remoteingress_edge::Edge;
use remoteingress_hub::{Hub, HubHandle};
use remoteingress_tunnel::HubIdentity;
use remoteingress_wire::token::ConnectionToken;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const ADMIN_TOKEN: &str = "admin-token-for-tests";

type Admin =
    HubAdminClient<InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>>;

fn with_token(mut request: Request<()>) -> Result<Request<()>, Status> {
    let value: MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

struct ControlPlane {
    state: tempfile::TempDir,
    hub: HubHandle,
    admin_addr: SocketAddr,
    admin: Admin,
    stop: CancellationToken,
}

async fn start_hub_with_state(state: &std::path::Path, port: u16) -> HubHandle {
    let mut options = hub_options(port);
    options.state_file = Some(state.join("edges.json"));
    start_hub_with(state, options).await
}

/// Admin API options for tests: loopback, any port, the test token, default limits.
fn admin_options(edges_file_mode: bool) -> AdminOptions {
    AdminOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        token: Some(ADMIN_TOKEN.into()),
        tls: None,
        public_host: None,
        public_port: 443,
        peers: Vec::new(),
        edges_file_mode,
        limits: ApiLimits::default(),
        registry: prometheus::Registry::new(),
    }
}

async fn serve_admin(
    hub: &HubHandle,
    stop: &CancellationToken,
    edges_file_mode: bool,
) -> SocketAddr {
    let options = AdminOptions {
        public_host: Some("hub.example.com".into()),
        ..admin_options(edges_file_mode)
    };
    serve_hub_admin(hub.clone(), options, stop.clone())
        .await
        .unwrap()
        .local_addr
}

impl ControlPlane {
    async fn new() -> Self {
        init_logs();
        let state = tempfile::tempdir().unwrap();
        let hub = start_hub_with_state(state.path(), 0).await;
        let stop = CancellationToken::new();
        let admin_addr = serve_admin(&hub, &stop, false).await;
        let admin =
            HubAdminClient::with_interceptor(channel(admin_addr).await, with_token as fn(_) -> _);
        Self {
            state,
            hub,
            admin_addr,
            admin,
            stop,
        }
    }
}

fn edge_message(id: &str, ports: &[(u16, u16)]) -> pb::Edge {
    pb::Edge {
        id: id.into(),
        secret: SECRET.into(),
        listen_ports: ports.iter().map(|(p, _)| u32::from(*p)).collect(),
        target_ports: ports
            .iter()
            .map(|(p, t)| (u32::from(*p), u32::from(*t)))
            .collect(),
        ..Default::default()
    }
}

async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchEventsResponse>,
) -> pb::watch_events_response::Event {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
        .event
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_rpc_against_a_live_hub_and_edge() {
    use pb::watch_events_response::Event;
    let mut cp = ControlPlane::new().await;
    let target = echo_target().await;
    let port = free_port(EDGE_IP);
    let mut events = cp
        .admin
        .watch_events(pb::WatchEventsRequest {
            edge_id: "e1".into(),
            kinds: vec![
                pb::EventKind::EdgeConnected as i32,
                pb::EventKind::EdgeDisconnected as i32,
            ],
        })
        .await
        .unwrap()
        .into_inner();

    cp.admin
        .update_allowed_edges(pb::UpdateAllowedEdgesRequest {
            edges: vec![edge_message("e1", &[(port, target.addr.port())])],
        })
        .await
        .unwrap();
    let edge = start_edge(&cp.hub, "e1").await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::EdgeConnected(_)
    ));
    wait_listening(&edge, port).await;

    // Validation: one bad edge rejects the whole request, naming edge and field.
    let mut bad = edge_message("e2", &[(8080, 8080)]);
    bad.firewall_config = Some(pb::FirewallConfig {
        blocked_ips: vec!["10.0.0.0/33".into()],
        ..Default::default()
    });
    let error = cp
        .admin
        .update_allowed_edges(pb::UpdateAllowedEdgesRequest {
            edges: vec![edge_message("e1", &[]), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("\"e2\"") && error.message().contains("blockedIps[0]"),
        "{}",
        error.message()
    );
    let mut out_of_range = edge_message("e1", &[]);
    out_of_range.listen_ports = vec![70_000];
    let error = cp
        .admin
        .upsert_edge(pb::UpsertEdgeRequest {
            edge: Some(out_of_range),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("listenPorts[0]"),
        "{}",
        error.message()
    );

    let listed = cp
        .admin
        .list_edges(pb::ListEdgesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.edges.len(),
        1,
        "the rejected requests changed nothing"
    );
    let e1 = &listed.edges[0];
    assert_eq!((e1.id.as_str(), e1.connected), ("e1", true));
    assert_eq!(e1.listen_ports, vec![u32::from(port)]);

    // A port added through the API is accepted on the edge.
    let extra = free_port(EDGE_IP);
    cp.admin
        .upsert_edge(pb::UpsertEdgeRequest {
            edge: Some(edge_message(
                "e1",
                &[(port, target.addr.port()), (extra, target.addr.port())],
            )),
        })
        .await
        .unwrap();
    wait_listening(&edge, extra).await;
    let data = pattern(3000, 4);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, extra), &data).await,
        data
    );
    let applied = eventually("the edge to acknowledge version 2", || {
        let mut admin = cp.admin.clone();
        async move {
            let edges = admin
                .list_edges(pb::ListEdgesRequest {})
                .await
                .ok()?
                .into_inner()
                .edges;
            (edges[0].applied_config_version == 2).then_some(edges[0].desired_config_version)
        }
    })
    .await;
    assert_eq!(applied, 2);

    let status = cp
        .admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.running);
    assert_eq!(status.tunnel_port, u32::from(cp.hub.local_addr().port()));
    assert_eq!(status.connected_edges.len(), 1);
    let connected = &status.connected_edges[0];
    assert_eq!(connected.transport, pb::Transport::TcpTls as i32);
    assert!(connected.bytes_in >= 3000 && connected.bytes_out >= 3000);

    assert_eq!(status.pin, cp.hub.pin(), "the status carries the pin");
    let token = cp
        .admin
        .create_connection_token(pb::CreateConnectionTokenRequest {
            edge_id: "e1".into(),
            ..pb::CreateConnectionTokenRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let decoded = ConnectionToken::decode(&token.token).unwrap();
    assert_eq!(decoded.hub_host, "hub.example.com");
    assert_eq!(decoded.hub_port, 443);
    assert_eq!(decoded.secret, SECRET);
    assert_eq!(decoded.pin.as_deref(), Some(cp.hub.pin()));
    let named = cp
        .admin
        .create_connection_token(pb::CreateConnectionTokenRequest {
            edge_id: "e1".into(),
            hub_host: "hub-2.example.com".into(),
            hub_port: 8443,
            ..pb::CreateConnectionTokenRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let decoded = ConnectionToken::decode(&named.token).unwrap();
    assert_eq!(
        (decoded.hub_host.as_str(), decoded.hub_port),
        ("hub-2.example.com", 8443),
        "the request's host and port win over --public-host"
    );

    let disconnected = cp
        .admin
        .disconnect_edge(pb::DisconnectEdgeRequest { id: "e1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(disconnected.disconnected);
    assert!(matches!(
        next_event(&mut events).await,
        Event::EdgeDisconnected(_)
    ));
    assert!(
        matches!(next_event(&mut events).await, Event::EdgeConnected(_)),
        "the edge comes back"
    );

    let deleted = cp
        .admin
        .delete_edge(pb::DeleteEdgeRequest { id: "e1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert!(matches!(
        next_event(&mut events).await,
        Event::EdgeDisconnected(_)
    ));
    assert!(cp
        .admin
        .list_edges(pb::ListEdgesRequest {})
        .await
        .unwrap()
        .into_inner()
        .edges
        .is_empty());
    edge.shutdown().await;
    cp.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_the_bearer_token_except_health() {
    let cp = ControlPlane::new().await;
    let plain = channel(cp.admin_addr).await;
    let error = HubAdminClient::new(plain.clone())
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    let wrong = HubAdminClient::with_interceptor(plain.clone(), |mut request: Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        Ok(request)
    })
    .get_status(pb::GetStatusRequest {})
    .await
    .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let health = tonic_health::pb::health_client::HealthClient::new(plain)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "remoteingress.v1.HubAdmin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowed_set_survives_a_restart_without_plaintext_secrets() {
    let mut cp = ControlPlane::new().await;
    let target = echo_target().await;
    let port = free_port(EDGE_IP);
    cp.admin
        .update_allowed_edges(pb::UpdateAllowedEdgesRequest {
            edges: vec![edge_message("e1", &[(port, target.addr.port())])],
        })
        .await
        .unwrap();
    let edge = start_edge(&cp.hub, "e1").await;
    wait_listening(&edge, port).await;

    let state = std::fs::read_to_string(cp.state.path().join("edges.json")).unwrap();
    assert!(
        state.contains("\"e1\"") && !state.contains(SECRET),
        "{state}"
    );

    let hub_port = cp.hub.local_addr().port();
    cp.stop.cancel();
    cp.hub.shutdown().await;
    eventually("the edge to notice", || async {
        (!edge.status().connected).then_some(())
    })
    .await;

    let hub = start_hub_with_state(cp.state.path(), hub_port).await;
    let stop = CancellationToken::new();
    let addr = serve_admin(&hub, &stop, false).await;
    let mut admin = HubAdminClient::with_interceptor(channel(addr).await, with_token as fn(_) -> _);
    let edges = admin
        .list_edges(pb::ListEdgesRequest {})
        .await
        .unwrap()
        .into_inner()
        .edges;
    assert_eq!(edges.len(), 1);
    assert_eq!(
        edges[0].target_ports.get(&u32::from(port)),
        Some(&u32::from(target.addr.port()))
    );
    eventually("the edge to reconnect and get its ports", || async {
        let status = edge.status();
        (status.connected && status.connections >= 2 && status.listen_ports.contains(&port))
            .then_some(())
    })
    .await;
    let data = pattern(777, 1);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, port), &data).await,
        data
    );

    let request = |secret: &str| pb::CreateConnectionTokenRequest {
        edge_id: "e1".into(),
        secret: secret.into(),
        ..pb::CreateConnectionTokenRequest::default()
    };
    let error = admin
        .create_connection_token(request(""))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    let error = admin
        .create_connection_token(request("wrong"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(admin.create_connection_token(request(SECRET)).await.is_ok());
    edge.shutdown().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_the_hub() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("edges.json"), "{\"format\":1,").unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    options.state_file = Some(state.path().join("edges.json"));
    let error = Hub::start(options, &identity)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("corrupt"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_when_an_edges_file_rules() {
    let cp = ControlPlane::new().await;
    let addr = serve_admin(&cp.hub, &cp.stop, true).await;
    let mut admin = HubAdminClient::with_interceptor(channel(addr).await, with_token as fn(_) -> _);
    let error = admin
        .upsert_edge(pb::UpsertEdgeRequest {
            edge: Some(edge_message("e1", &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(admin.list_edges(pb::ListEdgesRequest {}).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_status_api_reports_state_and_events() {
    use pb::edge_status_watch_events_response::Event;
    let setup = Setup::new().await;
    let stop = CancellationToken::new();
    let served = serve_edge_status(
        setup.edge.clone(),
        "127.0.0.1:0".parse().unwrap(),
        stop.clone(),
    )
    .await
    .unwrap();
    let mut client = EdgeStatusClient::new(channel(served.local_addr).await);
    let status = client
        .get_status(pb::EdgeStatusGetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.running && status.connected);
    assert_eq!(status.listen_ports, vec![u32::from(setup.edge_port)]);
    assert_eq!(status.transport, pb::Transport::TcpTls as i32);

    let mut events = client
        .watch_events(pb::EdgeStatusWatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let extra = free_port(EDGE_IP);
    let target = setup.target.addr.port();
    setup
        .hub
        .upsert_edge(allowed("e1", &[(setup.edge_port, target), (extra, target)]))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Event::PortsChanged(ports)) = event.event else {
        panic!("expected a ports change, got {event:?}");
    };
    assert!(ports.update);
    assert!(ports.listen_ports.contains(&u32::from(extra)));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_serves_tls_when_given_a_certificate() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub(state.path(), 0).await;
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (
        state.path().join("admin.crt"),
        state.path().join("admin.key"),
    );
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    let stop = CancellationToken::new();
    let options = AdminOptions {
        tls: Some((cert, key)),
        public_port: 8443,
        ..admin_options(false)
    };
    let addr = serve_hub_admin(hub.clone(), options, stop.clone())
        .await
        .unwrap()
        .local_addr;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            generated.cert.pem(),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = HubAdminClient::with_interceptor(channel, with_token as fn(_) -> _);
    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.running);
    let plaintext = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let refused = HubAdminClient::with_interceptor(plaintext, with_token as fn(_) -> _)
        .get_status(pb::GetStatusRequest {})
        .await;
    assert!(refused.is_err(), "plaintext must not reach a TLS admin API");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_event_stream_never_holds_up_a_graceful_stop() {
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub_with_state(state.path(), 0).await;
    let stop = CancellationToken::new();
    let options = admin_options(false);
    let served = serve_hub_admin(hub.clone(), options, stop.clone())
        .await
        .unwrap();
    let mut admin = HubAdminClient::with_interceptor(
        channel(served.local_addr).await,
        with_token as fn(_) -> _,
    );
    let mut events = admin
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("the stream to end");
    assert_eq!(ended.unwrap().unwrap_err().code(), Code::Unavailable);
    tokio::time::timeout(Duration::from_secs(20), served.task)
        .await
        .expect("the server to stop while a watcher is connected")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_streamed_with_their_kind() {
    use pb::watch_events_response::Event;
    let mut cp = ControlPlane::new().await;
    let mut events = cp
        .admin
        .watch_events(pb::WatchEventsRequest {
            edge_id: String::new(),
            kinds: vec![pb::EventKind::AuthFailed as i32],
        })
        .await
        .unwrap()
        .into_inner();
    let intruder = Edge::start(edge_options(&cp.hub, "nobody", SECRET))
        .await
        .unwrap();
    let Event::AuthFailed(failure) = next_event(&mut events).await else {
        panic!("only auth failures were asked for");
    };
    assert_eq!(failure.kind, "bad_credentials");
    assert!(failure.reason.contains("\"nobody\""), "{}", failure.reason);
    assert!(failure.remote_addr.starts_with("127.0.0.1:"));
    intruder.shutdown().await;
    cp.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_limits_watchers_and_counts_wrong_tokens() {
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub_with_state(state.path(), 0).await;
    let stop = CancellationToken::new();
    let registry = prometheus::Registry::new();
    let options = AdminOptions {
        limits: ApiLimits {
            max_watchers: 1,
            ..ApiLimits::default()
        },
        registry: registry.clone(),
        ..admin_options(false)
    };
    let served = serve_hub_admin(hub.clone(), options, stop.clone())
        .await
        .unwrap();
    let mut admin = HubAdminClient::with_interceptor(
        channel(served.local_addr).await,
        with_token as fn(_) -> _,
    );
    let watch = pb::WatchEventsRequest::default;
    let first = admin.watch_events(watch()).await.unwrap();
    let second = admin.watch_events(watch()).await.unwrap_err();
    assert_eq!(second.code(), tonic::Code::ResourceExhausted);
    drop(first);
    eventually("the watcher's slot is free again", || {
        let mut admin = admin.clone();
        async move { admin.watch_events(watch()).await.ok().map(|_| ()) }
    })
    .await;

    let mut stranger = HubAdminClient::new(channel(served.local_addr).await);
    for _ in 0..3 {
        let refused = stranger.get_status(pb::GetStatusRequest {}).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
    let failures = registry
        .gather()
        .iter()
        .find(|family| family.name() == "remoteingress_admin_auth_failures_total")
        .map(|family| family.get_metric()[0].get_counter().value());
    assert_eq!(failures, Some(3.0));
    stop.cancel();
}

/// A health call that sends its headers and never its body, on a raw HTTP/2 connection; the
/// returned handles keep it open.
async fn stalled_health_call(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    client
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap()
}

/// Unauthenticated clients stalling health calls (headers, no body) by the hundred take
/// nothing from authenticated calls: probes are served from a pool of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_health_calls_take_nothing_from_authenticated_calls() {
    let mut cp = ControlPlane::new().await;
    let mut stalled = Vec::new();
    let mut pings = Vec::new();
    // Twice the API's whole pool of calls, in as many streams as a connection may have.
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(cp.admin_addr).await.unwrap();
        let (mut client, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let mut ping = connection.ping_pong().unwrap();
        tokio::spawn(connection);
        for _ in 0..32 {
            stalled.push(stalled_health_call(&mut client).await);
        }
        // Once the server has answered a PING sent after them, it has read every call.
        ping.ping(h2::Ping::opaque()).await.unwrap();
        pings.push((client, ping));
    }
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        cp.admin.list_edges(pb::ListEdgesRequest::default()),
    )
    .await
    .expect("an authenticated call is served while health calls are stalled");
    served.unwrap();
    drop(stalled);
    cp.stop.cancel();
}

/// A configuration larger than an edge accepts is refused at the API, saying so; a set larger
/// than gRPC's usual 4 MiB is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_and_configuration_sizes_agree_end_to_end() {
    let mut cp = ControlPlane::new().await;
    let blocked = |count: usize, edge: usize| -> Vec<String> {
        (0..count)
            .map(|i| format!("10.{}.{}.{}/32", edge % 256, (i / 256) % 256, i % 256))
            .collect()
    };
    let mut huge = edge_message("huge", &[(8080, 8080)]);
    huge.firewall_config = Some(pb::FirewallConfig {
        blocked_ips: blocked(65_000, 0),
        ..Default::default()
    });
    let refused = cp
        .admin
        .upsert_edge(pb::UpsertEdgeRequest { edge: Some(huge) })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("more than the")
            && refused.message().contains("an edge accepts"),
        "{}",
        refused.message()
    );

    // 80 edges with 4,000 blocked addresses each: about 7 MiB.
    let edges: Vec<pb::Edge> = (0..80)
        .map(|i| {
            let mut edge = edge_message(&format!("e{i}"), &[(8080, 8080)]);
            edge.firewall_config = Some(pb::FirewallConfig {
                blocked_ips: blocked(4_000, i),
                ..Default::default()
            });
            edge
        })
        .collect();
    let request = pb::UpdateAllowedEdgesRequest { edges };
    assert!(prost::Message::encoded_len(&request) > 4 * 1024 * 1024);
    cp.admin.update_allowed_edges(request).await.unwrap();
    assert_eq!(cp.hub.list_edges().len(), 80);
    cp.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_writes_that_would_let_hubs_diverge() {
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let options = remoteingress_hub::HubOptions {
        replica: true,
        ..hub_options(0)
    };
    let hub = Hub::start(options, &identity).await.unwrap();
    let stop = CancellationToken::new();
    let addr = serve_admin(&hub, &stop, false).await;
    let mut admin = HubAdminClient::with_interceptor(channel(addr).await, with_token as fn(_) -> _);
    let upsert = |ports: &[(u16, u16)], generation: Option<u64>| {
        let edge = pb::Edge {
            generation,
            ..edge_message("e1", ports)
        };
        let mut admin = admin.clone();
        async move {
            admin
                .upsert_edge(pb::UpsertEdgeRequest { edge: Some(edge) })
                .await
                .map_err(|status| (status.code(), status.message().to_owned()))
        }
    };
    let refused = upsert(&[(80, 80)], None).await.unwrap_err();
    assert_eq!(refused.0, Code::FailedPrecondition);
    assert!(refused.1.contains("generation"), "{}", refused.1);
    assert!(upsert(&[(80, 80)], Some(5)).await.is_ok());
    assert!(
        upsert(&[(80, 80)], Some(5)).await.is_ok(),
        "the same write again"
    );
    let conflicting = upsert(&[(81, 81)], Some(5)).await.unwrap_err();
    assert_eq!(conflicting.0, Code::FailedPrecondition);
    let stale = upsert(&[(81, 81)], Some(4)).await.unwrap_err();
    assert!(stale.1.contains("older"), "{}", stale.1);
    assert!(upsert(&[(81, 81)], Some(6)).await.is_ok());
    let listed = admin.list_edges(pb::ListEdgesRequest {}).await.unwrap();
    let edge = &listed.into_inner().edges[0];
    assert_eq!((edge.generation, edge.listen_ports.clone()), (6, vec![81]));
    stop.cancel();
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_right_after_a_write_restarts_with_it() {
    let state = tempfile::tempdir().unwrap();
    let localhost = "127.0.0.1".parse().unwrap();
    let (tunnel, admin_port) = (free_port(localhost), free_port(localhost));
    let args: Vec<String> = [
        "hub",
        "--listen-address=127.0.0.1",
        &format!("--tunnel-port={tunnel}"),
        &format!("--admin-addr=127.0.0.1:{admin_port}"),
        &format!("--metrics-addr=127.0.0.1:{}", free_port(localhost)),
        &format!("--state-dir={}", state.path().display()),
    ]
    .map(String::from)
    .to_vec();
    let env = [("REMOTEINGRESS_ADMIN_TOKEN", ADMIN_TOKEN)];
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let connect = || async {
        wait_port(admin_port).await;
        HubAdminClient::with_interceptor(channel(admin_addr).await, with_token as fn(_) -> _)
    };

    let hub = spawn_binary(&args, &env);
    let mut admin = connect().await;
    for round in 0..20u16 {
        let edge = edge_message("e1", &[(8000 + round, 80)]);
        admin
            .upsert_edge(pb::UpsertEdgeRequest { edge: Some(edge) })
            .await
            .unwrap();
    }
    // SIGKILL as soon as the last write is answered: nothing gets to flush on the way out.
    drop(hub);

    let _hub = spawn_binary(&args, &env);
    let listed = connect()
        .await
        .list_edges(pb::ListEdgesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.edges.len(), 1);
    assert_eq!(listed.edges[0].listen_ports, [8019]);
}
