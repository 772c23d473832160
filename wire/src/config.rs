//! The edge configuration the hub sends in its handshake reply and in CONFIG frames.
//!
//! JSON keys are exactly those of the original system (`listenPorts`, `firewallConfig`, …);
//! unknown keys are ignored so that newer hubs can talk to older edges.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// Default seconds between STUN public-IP refreshes.
pub const DEFAULT_STUN_INTERVAL_SECS: u64 = 300;

/// Ports, STUN interval and firewall rules of one edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EdgeConfig {
    /// TCP ports the edge listens on.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 1, max = 65535))))]
    #[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-list-type" = "set")))]
    pub listen_ports: Vec<u16>,
    /// UDP ports the edge listens on.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 1, max = 65535))))]
    #[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-list-type" = "set")))]
    pub listen_ports_udp: Vec<u16>,
    /// Seconds between STUN public-IP refreshes; 0 disables refreshing.
    #[serde(default = "default_stun_interval")]
    pub stun_interval_secs: u64,
    /// Firewall rules the edge applies with nftables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_config: Option<FirewallConfig>,
    /// Per-edge increasing config version (our extension; acknowledged with CONFIG_ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub version: Option<u64>,
    /// How new the configuration is, set by its source (edges file, admin caller, operator) and
    /// the same on every hub that serves the edge: an edge applies only a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub generation: Option<u64>,
}

/// An IPv4 or IPv6 address or CIDR, as the schema checks it (`parse_cidr` is the full check).
#[cfg(feature = "schema")]
const CIDR_PATTERN: &str = r"^(((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$";

/// A rate-limit or rule id.
#[cfg(feature = "schema")]
const ID_PATTERN: &str = r"^[A-Za-z0-9._-]{1,64}$";

fn default_stun_interval() -> u64 {
    DEFAULT_STUN_INTERVAL_SECS
}

impl EdgeConfig {
    /// True if both ask for the same ports, STUN interval and firewall, whatever their version
    /// and generation.
    pub fn same_content(&self, other: &EdgeConfig) -> bool {
        let bare = |config: &EdgeConfig| EdgeConfig {
            version: None,
            generation: None,
            ..config.clone()
        };
        bare(self) == bare(other)
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen_ports: Vec::new(),
            listen_ports_udp: Vec::new(),
            stun_interval_secs: DEFAULT_STUN_INTERVAL_SECS,
            firewall_config: None,
            version: None,
            generation: None,
        }
    }
}

/// Addresses to block, rate limits and explicit rules for an edge's nftables table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FirewallConfig {
    /// IPv4/IPv6 addresses or CIDRs whose packets to the edge's ports are dropped.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = CIDR_PATTERN))))]
    pub blocked_ips: Vec<String>,
    /// Rate limits per destination port (one of the edge's).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"])))]
    pub rate_limits: Vec<RateLimit>,
    /// Explicit accept/drop/reject rules.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"])))]
    pub rules: Vec<FirewallRule>,
}

/// A transport protocol a firewall entry applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The lowercase name used in configuration, metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rate limit on one destination port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Unique id within the config.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = ID_PATTERN)))]
    pub id: String,
    /// Destination port.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535)))]
    pub port: u16,
    /// Protocol; both when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<String>", regex(pattern = "^(tcp|udp)$"))
    )]
    pub protocol: Option<Protocol>,
    /// `N/second`, `N/minute` or `N/hour`.
    #[cfg_attr(
        feature = "schema",
        schemars(regex(pattern = r"^[1-9][0-9]{0,9}/(second|minute|hour)$"))
    )]
    pub rate: String,
    /// Packets allowed above the rate in a burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub burst: Option<u32>,
    /// Limit each source address separately.
    #[serde(default, rename = "perSourceIP")]
    pub per_source_ip: bool,
}

/// Which hook a rule applies to. Only [`Direction::Input`] passes validation; the others are
/// parsed (the original system accepted them) to be refused with a clear error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Packets to this host.
    Input,
    /// Packets from this host.
    Output,
    /// Packets routed through this host.
    Forward,
}

/// What a rule does with matching packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the packet through.
    Accept,
    /// Silently discard it.
    Drop,
    /// Discard it and tell the sender.
    Reject,
}

/// An explicit firewall rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FirewallRule {
    /// Unique id within the config.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = ID_PATTERN)))]
    pub id: String,
    /// Hook the rule applies to.
    pub direction: Direction,
    /// Verdict for matching packets.
    pub action: Action,
    /// Source address or CIDR to match.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(regex(pattern = CIDR_PATTERN)))]
    pub source_ip: Option<String>,
    /// Destination port to match: required, and one the edge listens on for `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535)))]
    pub dest_port: Option<u16>,
    /// Protocol to match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<String>", regex(pattern = "^(tcp|udp)$"))
    )]
    pub protocol: Option<Protocol>,
    /// Free text kept with the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = 128)))]
    pub comment: Option<String>,
}

/// The unit of a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

/// A parsed `N/unit` rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Packets per unit.
    pub count: u32,
    /// Time unit.
    pub unit: RateUnit,
}

impl Rate {
    /// Parses `N/second`, `N/minute` or `N/hour` with N ≥ 1.
    pub fn parse(text: &str) -> Option<Self> {
        let (count, unit) = text.split_once('/')?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let count: u32 = count.parse().ok().filter(|&n| n > 0)?;
        let unit = match unit {
            "second" => RateUnit::Second,
            "minute" => RateUnit::Minute,
            "hour" => RateUnit::Hour,
            _ => return None,
        };
        Some(Self { count, unit })
    }
}

/// Parses an address or CIDR as used in `blockedIps` and `sourceIP`.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Everything wrong with a configuration, each naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ConfigError {
    /// One entry per problem, `field: what is wrong`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

const MAX_ID_LEN: usize = 64;
const MAX_COMMENT_LEN: usize = 128;

/// Largest configuration, as JSON, that a hub sends and an edge accepts: it travels in the
/// handshake reply, which an edge reads up to [`crate::handshake::MAX_REPLY_LEN`], with room
/// left for the reply's other fields and the version.
pub const MAX_CONFIG_LEN: usize = crate::handshake::MAX_REPLY_LEN - 16 * 1024;

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: self.0 })
        }
    }

    fn add(&mut self, field: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }

    fn ports(&mut self, field: &str, ports: &[u16]) {
        let mut seen = HashSet::new();
        for (i, port) in ports.iter().enumerate() {
            if *port == 0 {
                self.add(format_args!("{field}[{i}]"), "port 0 is not a usable port");
            } else if !seen.insert(port) {
                self.add(
                    format_args!("{field}[{i}]"),
                    format_args!("port {port} is listed twice"),
                );
            }
        }
    }

    fn cidr(&mut self, field: impl fmt::Display, text: &str) {
        if parse_cidr(text).is_none() {
            self.add(
                field,
                format_args!("{text:?} is not an IPv4/IPv6 address or CIDR (e.g. 10.0.0.0/8)"),
            );
        }
    }

    fn ids<'a>(&mut self, field: &str, ids: impl Iterator<Item = &'a str>) {
        let mut seen = HashSet::new();
        for (i, id) in ids.enumerate() {
            let valid = !id.is_empty()
                && id.len() <= MAX_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !valid {
                self.add(
                    format_args!("{field}[{i}].id"),
                    format_args!("{id:?} must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -"),
                );
            } else if !seen.insert(id) {
                self.add(
                    format_args!("{field}[{i}].id"),
                    format_args!("id {id:?} is used twice"),
                );
            }
        }
    }
}

impl EdgeConfig {
    /// Checks ports, addresses, rates and ids, reporting every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        problems.ports("listenPorts", &self.listen_ports);
        problems.ports("listenPortsUdp", &self.listen_ports_udp);
        if let Some(firewall) = &self.firewall_config {
            firewall.check(&mut problems, self);
        }
        let len = serde_json::to_vec(self).map_or(0, |json| json.len());
        if len > MAX_CONFIG_LEN {
            problems.add(
                "configuration",
                format_args!("{len} bytes as JSON, more than the {MAX_CONFIG_LEN} an edge accepts"),
            );
        }
        problems.into_result()
    }
}

/// Why a firewall entry may not name `port`: it must be one the edge listens on (for
/// `protocol`, or for either when absent), as pushed rules act on nothing else.
fn not_the_edges_port(
    config: &EdgeConfig,
    protocol: Option<Protocol>,
    port: u16,
) -> Option<String> {
    let tcp = config.listen_ports.contains(&port);
    let udp = config.listen_ports_udp.contains(&port);
    let assigned = match protocol {
        Some(Protocol::Tcp) => tcp,
        Some(Protocol::Udp) => udp,
        None => tcp || udp,
    };
    (!assigned).then(|| {
        let on = protocol.map_or_else(String::new, |p| format!("/{p}"));
        format!(
            "port {port}{on} is not one of the edge's ports (listenPorts, listenPortsUdp); \
             firewall rules act only on those"
        )
    })
}

impl FirewallRule {
    /// Where and why the rule would reach beyond the edge's input path and ports, if it does.
    fn out_of_scope(&self, config: &EdgeConfig) -> Option<(&'static str, String)> {
        if self.direction != Direction::Input {
            let problem = "only input rules are accepted: an output or forward rule would act on \
                           the host's own or routed traffic, not on the edge's ports";
            return Some(("direction", problem.to_owned()));
        }
        match self.dest_port {
            None => Some((
                "destPort",
                "a rule must name one of the edge's ports (listenPorts, listenPortsUdp)".to_owned(),
            )),
            Some(0) => None,
            Some(port) => not_the_edges_port(config, self.protocol, port).map(|p| ("destPort", p)),
        }
    }
}

impl RateLimit {
    /// Where and why the limit would act on a port that is not the edge's, if it does.
    fn out_of_scope(&self, config: &EdgeConfig) -> Option<(&'static str, String)> {
        (self.port != 0)
            .then(|| not_the_edges_port(config, self.protocol, self.port))
            .flatten()
            .map(|problem| ("port", problem))
    }
}

/// Keeps the entries of `list` (the firewall list named `name`) that `out_of_scope` lets
/// through, and names each one it does not in `left_out`.
fn keep_in_scope<T>(
    list: &mut Vec<T>,
    name: &str,
    left_out: &mut Vec<String>,
    out_of_scope: impl Fn(&T) -> Option<(&'static str, String)>,
) {
    for (i, entry) in std::mem::take(list).into_iter().enumerate() {
        match out_of_scope(&entry) {
            Some((field, problem)) => {
                left_out.push(format!("firewallConfig.{name}[{i}].{field}: {problem}"));
            }
            None => list.push(entry),
        }
    }
}

impl EdgeConfig {
    /// The configuration without the firewall entries that reach beyond the edge's input path
    /// and ports, and what was left out (each naming its field). Our hubs refuse such entries;
    /// an original hub accepted them, and its edge applies the rest, its ports included, rather
    /// than refusing the whole configuration.
    pub fn within_edge_scope(&self) -> (EdgeConfig, Vec<String>) {
        let mut scoped = self.clone();
        let mut left_out = Vec::new();
        if let Some(firewall) = &mut scoped.firewall_config {
            keep_in_scope(&mut firewall.rules, "rules", &mut left_out, |rule| {
                rule.out_of_scope(self)
            });
            keep_in_scope(
                &mut firewall.rate_limits,
                "rateLimits",
                &mut left_out,
                |limit| limit.out_of_scope(self),
            );
        }
        (scoped, left_out)
    }
}

impl FirewallConfig {
    fn check(&self, problems: &mut Problems, config: &EdgeConfig) {
        for (i, ip) in self.blocked_ips.iter().enumerate() {
            problems.cidr(format_args!("firewallConfig.blockedIps[{i}]"), ip);
        }
        let limits = "firewallConfig.rateLimits";
        problems.ids(limits, self.rate_limits.iter().map(|l| l.id.as_str()));
        for (i, limit) in self.rate_limits.iter().enumerate() {
            if limit.port == 0 {
                problems.add(
                    format_args!("{limits}[{i}].port"),
                    "port 0 is not a usable port",
                );
            } else if let Some((field, problem)) = limit.out_of_scope(config) {
                problems.add(format_args!("{limits}[{i}].{field}"), problem);
            }
            if Rate::parse(&limit.rate).is_none() {
                problems.add(
                    format_args!("{limits}[{i}].rate"),
                    format_args!(
                        "{:?} is not a rate like 100/second, 1000/minute or 5000/hour",
                        limit.rate
                    ),
                );
            }
            if limit.burst == Some(0) {
                problems.add(
                    format_args!("{limits}[{i}].burst"),
                    "burst must be at least 1",
                );
            }
        }
        let rules = "firewallConfig.rules";
        problems.ids(rules, self.rules.iter().map(|r| r.id.as_str()));
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(source) = &rule.source_ip {
                problems.cidr(format_args!("{rules}[{i}].sourceIP"), source);
            }
            if let Some((field, problem)) = rule.out_of_scope(config) {
                problems.add(format_args!("{rules}[{i}].{field}"), problem);
            }
            if rule.dest_port == Some(0) {
                problems.add(
                    format_args!("{rules}[{i}].destPort"),
                    "port 0 is not a usable port",
                );
            } else if rule.dest_port.is_some() && rule.protocol.is_none() {
                problems.add(
                    format_args!("{rules}[{i}].protocol"),
                    "a rule with destPort needs protocol tcp or udp",
                );
            }
            if let Some(comment) = &rule.comment {
                if comment.len() > MAX_COMMENT_LEN || comment.chars().any(char::is_control) {
                    problems.add(
                        format_args!("{rules}[{i}].comment"),
                        format_args!("must be at most {MAX_COMMENT_LEN} bytes of printable text"),
                    );
                }
            }
        }
    }
}

/// Per-port targets of an edge: a port or a host for some edge ports; every other port goes to
/// the same port of the hub's target host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PortTargets {
    /// Target port per edge port, where they differ (`targetPorts`).
    #[serde(
        rename = "targetPorts",
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_map"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "BTreeMap<String, u16>"))]
    pub ports: BTreeMap<u16, u16>,
    /// Target host per edge port, where it is not the hub's target host (`targetHosts`): a
    /// Kubernetes Service's cluster IP, say.
    #[serde(
        rename = "targetHosts",
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_map"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "BTreeMap<String, String>"))]
    pub hosts: BTreeMap<u16, String>,
}

impl PortTargets {
    /// The target port for connections the edge accepted on `edge_port`.
    pub fn port(&self, edge_port: u16) -> u16 {
        self.ports.get(&edge_port).copied().unwrap_or(edge_port)
    }

    /// The target host for `edge_port`, if it is not the hub's target host.
    pub fn host(&self, edge_port: u16) -> Option<&str> {
        self.hosts.get(&edge_port).map(String::as_str)
    }

    /// Checks that every port is usable and every host a plausible host name or address,
    /// reporting every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        for (from, to) in &self.ports {
            if *from == 0 || *to == 0 {
                problems.add(
                    format_args!("targetPorts[{from}]"),
                    format_args!("{from} -> {to}: port 0 is not a usable port"),
                );
            }
        }
        for (port, host) in &self.hosts {
            if *port == 0 {
                problems.add("targetHosts[0]", "port 0 is not a usable port");
            }
            if let Err(message) = validate_host(host) {
                problems.add(format_args!("targetHosts[{port}]"), message);
            }
        }
        problems.into_result()
    }
}

/// A host name (letters, digits, `-`, `_` and dots) or an IP address, as a target.
fn validate_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("{host:?} is not a host name or IP address"))
    }
}

/// Reads `{"80": …}`: map keys are strings in JSON and TOML.
fn port_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<u16, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    BTreeMap::<String, V>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, value)| match key.parse::<u16>() {
            Ok(port) => Ok((port, value)),
            Err(_) => Err(D::Error::custom(format!("map key {key:?} is not a port"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"{"listenPorts":[80,443],"listenPortsUdp":[53],"stunIntervalSecs":300,
 "firewallConfig":{"blockedIps":["10.0.0.0/8"],
   "rateLimits":[{"id":"http","port":80,"protocol":"tcp","rate":"100/second","burst":50,"perSourceIP":true}],
   "rules":[{"id":"office","direction":"input","action":"accept","sourceIP":"10.0.0.0/24","destPort":443,"protocol":"tcp"}]}}"#;

    #[test]
    fn parses_the_design_example() {
        let config: EdgeConfig = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(config.listen_ports, vec![80, 443]);
        assert_eq!(config.listen_ports_udp, vec![53]);
        let firewall = config.firewall_config.as_ref().unwrap();
        assert!(firewall.rate_limits[0].per_source_ip);
        assert_eq!(firewall.rules[0].source_ip.as_deref(), Some("10.0.0.0/24"));
        assert_eq!(config.validate(), Ok(()));
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["firewallConfig"]["rateLimits"][0]["perSourceIP"], true);
        assert_eq!(
            json["firewallConfig"]["rules"][0]["sourceIP"],
            "10.0.0.0/24"
        );
        assert_eq!(json["firewallConfig"]["rules"][0]["destPort"], 443);
    }

    #[test]
    fn ignores_unknown_keys_and_fills_defaults() {
        let config: EdgeConfig =
            serde_json::from_str(r#"{"listenPorts":[8080],"futureKey":{"x":1}}"#).unwrap();
        assert_eq!(config.listen_ports, vec![8080]);
        assert_eq!(config.stun_interval_secs, DEFAULT_STUN_INTERVAL_SECS);
        assert_eq!(config.firewall_config, None);
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("100/second"),
            Some(Rate {
                count: 100,
                unit: RateUnit::Second
            })
        );
        assert!(Rate::parse("1/hour").is_some());
        for bad in [
            "0/second",
            "100/sec",
            "/second",
            "-1/minute",
            "1e3/hour",
            "100",
            "+5/second",
        ] {
            assert_eq!(Rate::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let config: EdgeConfig = serde_json::from_str(
            r#"{"listenPorts":[0,80,80],
                "firewallConfig":{"blockedIps":["10.0.0.0/33","::1","nope"],
                  "rateLimits":[{"id":"a","port":80,"rate":"fast"},{"id":"a","port":81,"rate":"1/hour","burst":0}],
                  "rules":[{"id":"r","direction":"input","action":"drop","sourceIP":"300.1.1.1","destPort":22},
                           {"id":"o","direction":"output","action":"drop","destPort":80,"protocol":"tcp"},
                           {"id":"n","direction":"input","action":"drop"},
                           {"id":"u","direction":"input","action":"drop","destPort":80,"protocol":"udp"}]}}"#,
        )
        .unwrap();
        let problems = config.validate().unwrap_err().problems;
        let expected = [
            "listenPorts[0]: port 0",
            "listenPorts[2]: port 80 is listed twice",
            "firewallConfig.blockedIps[0]: \"10.0.0.0/33\"",
            "firewallConfig.blockedIps[2]: \"nope\"",
            "firewallConfig.rateLimits[1].id: id \"a\" is used twice",
            "firewallConfig.rateLimits[0].rate: \"fast\" is not a rate",
            "firewallConfig.rateLimits[1].burst",
            "firewallConfig.rateLimits[1].port: port 81 is not one of the edge's ports",
            "firewallConfig.rules[0].sourceIP: \"300.1.1.1\"",
            "firewallConfig.rules[0].protocol",
            "firewallConfig.rules[0].destPort: port 22 is not one of the edge's ports",
            "firewallConfig.rules[1].direction: only input rules",
            "firewallConfig.rules[2].destPort: a rule must name one of the edge's ports",
            "firewallConfig.rules[3].destPort: port 80/udp is not one of the edge's ports",
        ];
        for needle in expected {
            assert!(
                problems.iter().any(|p| p.starts_with(needle)),
                "missing {needle:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    /// What an original hub may send: the edge keeps its ports and the entries on them.
    #[test]
    fn entries_beyond_the_edges_ports_are_left_out_and_named() {
        let config: EdgeConfig = serde_json::from_str(
            r#"{"listenPorts":[80,443],
                "firewallConfig":{"blockedIps":["192.0.2.7"],
                  "rateLimits":[{"id":"http","port":80,"rate":"5/second"},{"id":"smtp","port":25,"rate":"5/second"}],
                  "rules":[{"id":"ssh","direction":"input","action":"accept","destPort":22,"protocol":"tcp"},
                           {"id":"web","direction":"input","action":"drop","sourceIP":"10.0.0.0/8","destPort":443,"protocol":"tcp"},
                           {"id":"out","direction":"output","action":"drop"}]}}"#,
        )
        .unwrap();
        assert!(config.validate().is_err());
        let (scoped, left_out) = config.within_edge_scope();
        assert_eq!(scoped.validate(), Ok(()));
        assert_eq!(scoped.listen_ports, [80, 443]);
        let firewall = scoped.firewall_config.unwrap();
        assert_eq!(firewall.blocked_ips, ["192.0.2.7"]);
        assert_eq!(firewall.rate_limits.len(), 1);
        assert_eq!(firewall.rules.len(), 1);
        assert_eq!(firewall.rules[0].id, "web");
        let fields: Vec<&str> = left_out
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "firewallConfig.rules[0].destPort",
                "firewallConfig.rules[2].direction",
                "firewallConfig.rateLimits[1].port"
            ]
        );
    }

    #[test]
    fn rejects_unknown_enum_values_clearly() {
        let err = serde_json::from_str::<EdgeConfig>(
            r#"{"firewallConfig":{"rules":[{"id":"r","direction":"sideways","action":"drop"}]}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("sideways"), "{err}");
    }

    fn arb_config() -> impl Strategy<Value = EdgeConfig> {
        let limit = (
            "[a-z]{1,8}",
            1u16..,
            proptest::option::of(prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]),
            (
                1u32..10_000,
                prop_oneof![Just("second"), Just("minute"), Just("hour")],
            ),
            proptest::option::of(1u32..1000),
            any::<bool>(),
        )
            .prop_map(
                |(id, port, protocol, (n, unit), burst, per_source_ip)| RateLimit {
                    id,
                    port,
                    protocol,
                    rate: format!("{n}/{unit}"),
                    burst,
                    per_source_ip,
                },
            );
        let rule = (
            "[a-z]{1,8}",
            prop_oneof![
                Just(Direction::Input),
                Just(Direction::Output),
                Just(Direction::Forward)
            ],
            prop_oneof![
                Just(Action::Accept),
                Just(Action::Drop),
                Just(Action::Reject)
            ],
            proptest::option::of(
                any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}/32", o[0], o[1], o[2], o[3])),
            ),
            proptest::option::of("[ -~]{0,20}"),
        )
            .prop_map(|(id, direction, action, source_ip, comment)| FirewallRule {
                id,
                direction,
                action,
                source_ip,
                dest_port: Some(443),
                protocol: Some(Protocol::Tcp),
                comment,
            });
        (
            proptest::collection::vec(any::<u16>(), 0..5),
            proptest::collection::vec(any::<u16>(), 0..5),
            any::<u64>(),
            proptest::option::of((
                proptest::collection::vec("[0-9]{1,3}\\.[0-9]{1,3}\\.0\\.0/16", 0..3),
                proptest::collection::vec(limit, 0..3),
                proptest::collection::vec(rule, 0..3),
            )),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(tcp, udp, stun, firewall, version, generation)| EdgeConfig {
                    listen_ports: tcp,
                    listen_ports_udp: udp,
                    stun_interval_secs: stun,
                    firewall_config: firewall.map(|(blocked_ips, rate_limits, rules)| {
                        FirewallConfig {
                            blocked_ips,
                            rate_limits,
                            rules,
                        }
                    }),
                    version,
                    generation,
                },
            )
    }

    proptest! {
        #[test]
        fn json_round_trip(config in arb_config()) {
            let json = serde_json::to_string(&config).unwrap();
            prop_assert_eq!(serde_json::from_str::<EdgeConfig>(&json).unwrap(), config);
        }

        /// What an edge keeps of any configuration reaches nothing beyond its ports.
        #[test]
        fn the_scoped_configuration_stays_within_the_edge(config in arb_config()) {
            let (scoped, left_out) = config.within_edge_scope();
            let beyond = |problem: &String| {
                problem.contains("edge's ports") || problem.contains("only input rules")
            };
            let problems = scoped.validate().err().map(|e| e.problems).unwrap_or_default();
            prop_assert!(!problems.iter().any(beyond), "{:?}", problems);
            prop_assert!(left_out.iter().all(beyond));
        }

        #[test]
        fn random_json_never_panics(text in "\\PC{0,200}") {
            if let Ok(config) = serde_json::from_str::<EdgeConfig>(&text) {
                let _ = config.validate();
            }
        }
    }
}
