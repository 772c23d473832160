//! The edge's nftables firewall: the hub's `firewallConfig` rendered as one libnftables JSON
//! batch that replaces the table `inet remoteingress` whole, applied with `nft -j -f -`.
//!
//! The table has an input chain only, and every rule in it matches one of the edge's own ports
//! (`listenPorts`, `listenPortsUdp`): what the hub pushes can act on the edge's traffic and on
//! nothing else of the host's, which matters most where the edge runs on the host network.
//!
//! We write the JSON ourselves (it is a small, documented schema) and run the `nft` binary: the
//! batch is atomic in the kernel, so a rejected config leaves the previous rules in force.
//!
//! Not the `nftables` crate (0.6.3), which has this schema as types, because it cannot express
//! what we need: its set statement has no per-element statements, so a per-source rate limit
//! (`update @set { ip saddr limit rate … }` on a set whose entries time out) cannot be written;
//! its `meter` stand-in has no expiry, so per-source state would grow until the table is
//! replaced; and its runner does not capture nft's stderr, which is the reason we report in
//! status, events and CONFIG_ACK when nft refuses a config.

use std::net::IpAddr;
use std::process::Stdio;

use remoteingress_wire::config::{parse_cidr, Action, ConfigError, Protocol, Rate, RateUnit};
use remoteingress_wire::EdgeConfig;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

/// The table the edge owns; nothing else is touched.
pub const TABLE: &str = "remoteingress";
/// Seconds a per-source rate-limit entry lives after its last packet.
const PER_SOURCE_TIMEOUT_SECS: u64 = 60;

/// Whether the edge uses nftables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirewallMode {
    /// Never touch nftables.
    Off,
    /// Use nftables when it works here; otherwise warn once and tunnel on.
    #[default]
    Auto,
    /// Refuse to start without working nftables.
    Required,
}

/// What the firewall is doing, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallState {
    /// `--firewall off`.
    Off,
    /// The last config is in force, with this many rules.
    Applied(usize),
    /// nftables cannot be used here; why.
    Unavailable(String),
    /// The last config failed and the previous rules stay; why.
    Error(String),
}

/// Why nftables could not be used or refused a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FirewallError {
    /// The nft command is empty.
    #[error("no nft command")]
    NoCommand,
    /// The nft command could not be run or talked to.
    #[error("cannot run {command}: {message}")]
    Run {
        /// The command line.
        command: String,
        /// What failed.
        message: String,
    },
    /// nft may not change the ruleset here (no root, no nf_tables, …); nft's own words.
    #[error("{0}")]
    NotPermitted(String),
    /// nft refused the batch; nft's own words. The previous rules stay in force.
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    /// The configuration is not valid (a rule outside the edge's input path or ports, …).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Runs `nft` (or a command that runs it, e.g. inside a network namespace).
#[derive(Debug, Clone)]
pub struct Firewall {
    command: Vec<String>,
}

impl Firewall {
    /// A firewall driven by `command` (program and leading arguments, e.g. `["nft"]`).
    pub fn new(command: Vec<String>) -> Self {
        Self { command }
    }

    fn nft(&self) -> Result<tokio::process::Command, FirewallError> {
        let (program, args) = self.command.split_first().ok_or(FirewallError::NoCommand)?;
        let mut command = tokio::process::Command::new(program);
        command.args(args).arg("-j");
        Ok(command)
    }

    fn run_failed(&self, message: impl std::fmt::Display) -> FirewallError {
        FirewallError::Run {
            command: self.command.join(" "),
            message: message.to_string(),
        }
    }

    /// Checks that nft runs and may change the ruleset here; why not otherwise.
    pub async fn probe(&self) -> Result<(), FirewallError> {
        let output = self
            .nft()?
            .args(["list", "tables"])
            .output()
            .await
            .map_err(|e| self.run_failed(e))?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            Err(FirewallError::NotPermitted(stderr))
        }
    }

    /// Replaces the table with `config`'s firewall in one transaction; the number of rules in
    /// force. A configuration that does not validate changes nothing.
    pub async fn apply(&self, config: &EdgeConfig) -> Result<usize, FirewallError> {
        config.validate()?;
        let (batch, rules) = ruleset(config);
        self.run_batch(&batch).await?;
        Ok(rules)
    }

    /// Removes the table (nothing of ours stays behind).
    pub async fn remove(&self) -> Result<(), FirewallError> {
        let batch = json!({ "nftables": [
            { "add": { "table": { "family": "inet", "name": TABLE } } },
            { "delete": { "table": { "family": "inet", "name": TABLE } } },
        ]});
        self.run_batch(&batch).await
    }

    async fn run_batch(&self, batch: &Value) -> Result<(), FirewallError> {
        let mut child = self
            .nft()?
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.run_failed(e))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| self.run_failed("it has no stdin"))?;
        stdin
            .write_all(batch.to_string().as_bytes())
            .await
            .map_err(|e| self.run_failed(format_args!("writing the batch: {e}")))?;
        drop(stdin);
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| self.run_failed(format_args!("waiting for it: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            Err(FirewallError::Refused(stderr))
        }
    }
}

fn saddr(ip: IpAddr) -> Value {
    let protocol = if ip.is_ipv4() { "ip" } else { "ip6" };
    json!({ "payload": { "protocol": protocol, "field": "saddr" } })
}

fn matches(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

/// An address or CIDR as an nft value.
fn address(text: &str) -> Option<(IpAddr, Value)> {
    let net = parse_cidr(text)?;
    let value = if net.prefix_len() == net.max_prefix_len() {
        json!(net.addr().to_string())
    } else {
        json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } })
    };
    Some((net.addr(), value))
}

/// A match on the destination port of `protocol`: one port, or a set of them.
fn dport(protocol: Protocol, ports: Value) -> Value {
    matches(
        json!({ "payload": { "protocol": protocol.as_str(), "field": "dport" } }),
        ports,
    )
}

/// The protocols `port` is the edge's on: `protocol` when named, else those it listens on.
fn protocols_of(config: &EdgeConfig, protocol: Option<Protocol>, port: u16) -> Vec<Protocol> {
    let listening = [
        (Protocol::Tcp, &config.listen_ports),
        (Protocol::Udp, &config.listen_ports_udp),
    ];
    listening
        .into_iter()
        .filter(|(p, ports)| protocol.map_or(ports.contains(&port), |named| named == *p))
        .map(|(p, _)| p)
        .collect()
}

fn limit(rate: Rate, burst: Option<u32>) -> Value {
    let per = match rate.unit {
        RateUnit::Second => "second",
        RateUnit::Minute => "minute",
        RateUnit::Hour => "hour",
    };
    json!({ "limit": { "rate": rate.count, "per": per, "burst": burst.unwrap_or(0), "inv": true } })
}

/// The JSON batch that replaces our table with `config`'s firewall, and how many rules it
/// holds. Order in the input chain: blocked addresses, explicit rules, then rate limits. The
/// configuration is valid: every rule is an input rule on one of the edge's ports.
pub fn ruleset(config: &EdgeConfig) -> (Value, usize) {
    let firewall = config.firewall_config.clone().unwrap_or_default();
    let table = json!({ "family": "inet", "name": TABLE });
    let mut commands = vec![
        json!({ "add": { "table": table } }),
        json!({ "delete": { "table": table } }),
        json!({ "add": { "table": table } }),
        json!({ "add": { "chain": {
            "family": "inet", "table": TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept",
        } } }),
    ];
    let mut rules: Vec<(Vec<Value>, Option<String>)> = Vec::new();

    let mut blocked: [Vec<Value>; 2] = Default::default();
    for text in &firewall.blocked_ips {
        if let Some((ip, value)) = address(text) {
            blocked[usize::from(ip.is_ipv6())].push(value);
        }
    }
    let edge_ports = [
        (Protocol::Tcp, &config.listen_ports),
        (Protocol::Udp, &config.listen_ports_udp),
    ];
    for (family, elements) in blocked.into_iter().enumerate() {
        if elements.is_empty() {
            continue;
        }
        let ip: IpAddr = if family == 0 {
            [0u8; 4].into()
        } else {
            [0u8; 16].into()
        };
        for (protocol, ports) in edge_ports {
            if !ports.is_empty() {
                let expr = vec![
                    dport(protocol, json!({ "set": ports })),
                    matches(saddr(ip), json!({ "set": elements })),
                    json!({ "drop": null }),
                ];
                rules.push((expr, None));
            }
        }
    }

    for rule in &firewall.rules {
        let (Some(port), Some(protocol)) = (rule.dest_port, rule.protocol) else {
            continue;
        };
        let mut expr = vec![dport(protocol, json!(port))];
        if let Some((ip, value)) = rule.source_ip.as_deref().and_then(address) {
            expr.push(matches(saddr(ip), value));
        }
        expr.push(match rule.action {
            Action::Accept => json!({ "accept": null }),
            Action::Drop => json!({ "drop": null }),
            Action::Reject => json!({ "reject": null }),
        });
        let comment = rule.comment.clone().or_else(|| Some(rule.id.clone()));
        rules.push((expr, comment));
    }

    for (index, rate_limit) in firewall.rate_limits.iter().enumerate() {
        let Some(rate) = Rate::parse(&rate_limit.rate) else {
            continue;
        };
        for protocol in protocols_of(config, rate_limit.protocol, rate_limit.port) {
            let port = dport(protocol, json!(rate_limit.port));
            let id = Some(rate_limit.id.clone());
            if !rate_limit.per_source_ip {
                let expr = vec![port, limit(rate, rate_limit.burst), json!({ "drop": null })];
                rules.push((expr, id));
                continue;
            }
            for (suffix, kind, ip) in [
                ("v4", "ipv4_addr", IpAddr::from([0u8; 4])),
                ("v6", "ipv6_addr", IpAddr::from([0u16; 8])),
            ] {
                let set = format!("rl{index}_{protocol}_{suffix}");
                commands.push(json!({ "add": { "set": {
                    "family": "inet", "table": TABLE, "name": set, "type": kind,
                    "flags": ["timeout"], "timeout": PER_SOURCE_TIMEOUT_SECS,
                } } }));
                let expr = vec![
                    port.clone(),
                    json!({ "set": {
                        "op": "update", "elem": saddr(ip), "set": format!("@{set}"),
                        "stmt": [limit(rate, rate_limit.burst)],
                    } }),
                    json!({ "drop": null }),
                ];
                rules.push((expr, id.clone()));
            }
        }
    }

    let count = rules.len();
    for (expr, comment) in rules {
        let mut rule = json!({ "family": "inet", "table": TABLE, "chain": "input", "expr": expr });
        if let Some(comment) = comment {
            rule["comment"] = json!(comment);
        }
        commands.push(json!({ "add": { "rule": rule } }));
    }
    (json!({ "nftables": commands }), count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_design_example_on_the_edges_ports_only() {
        let config: EdgeConfig = serde_json::from_str(
            r#"{"listenPorts":[80,443],"listenPortsUdp":[53],
                "firewallConfig":{"blockedIps":["10.0.0.0/8","2001:db8::/32","192.0.2.7"],
                "rateLimits":[{"id":"http","port":80,"protocol":"tcp","rate":"100/second","burst":50,"perSourceIP":true},
                              {"id":"dns","port":53,"rate":"10/minute"}],
                "rules":[{"id":"office","direction":"input","action":"accept","sourceIP":"10.0.0.0/24","destPort":443,"protocol":"tcp","comment":"ops"}]}}"#,
        )
        .unwrap();
        let (batch, rules) = ruleset(&config);
        // v4 and v6 blocked on TCP and UDP ports, office, http v4 + v6, dns on UDP only
        assert_eq!(rules, 8);
        let text = batch.to_string();
        let commands = batch["nftables"].as_array().unwrap();
        assert_eq!(
            commands[1]["delete"]["table"]["name"], TABLE,
            "replaces the table whole"
        );
        for needle in [
            r#"{"prefix":{"addr":"10.0.0.0","len":8}}"#,
            r#""192.0.2.7""#,
            r#"{"prefix":{"addr":"2001:db8::","len":32}}"#,
            r#"{"set":[80,443]}"#,
            r#"{"set":[53]}"#,
            r#""set":"@rl0_tcp_v4""#,
            r#""timeout":60"#,
            r#"{"limit":{"burst":50,"inv":true,"per":"second","rate":100}}"#,
            r#"{"limit":{"burst":0,"inv":true,"per":"minute","rate":10}}"#,
            r#""comment":"ops""#,
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        for chain in commands.iter().filter_map(|c| c["add"].get("chain")) {
            assert_eq!(chain["hook"], "input", "{chain}");
        }
        for rule in commands.iter().filter_map(|c| c["add"].get("rule")) {
            assert!(
                rule["expr"][0]["match"]["left"]["payload"]["field"] == "dport",
                "{rule}"
            );
        }
    }

    #[test]
    fn an_empty_config_still_replaces_the_table() {
        let (batch, rules) = ruleset(&EdgeConfig::default());
        assert_eq!(rules, 0);
        assert_eq!(batch["nftables"].as_array().unwrap().len(), 4);
    }
}
