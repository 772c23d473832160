//! Which IP addresses may stand for an internet client or for an edge's public address.
//!
//! An edge reports both; a compromised one could claim anything, and targets behind the hub may
//! trust the client address of a PROXY header for allowlists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address a client address an edge claims is, for deciding whether to believe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddressKind {
    /// Reachable on the internet (or of a range we do not single out).
    Public,
    /// A private, shared (carrier-grade NAT), link-local or unique-local address: real clients
    /// inside a network, allowed unless a setting says otherwise.
    Private,
    /// Loopback: a client on the edge's own host, so believable only from an edge on the
    /// hub's host (whose tunnel comes from loopback too).
    Loopback,
    /// Unspecified, multicast or broadcast: no client connects from these.
    Impossible,
}

/// Whether a client address an edge reports may be believed, given the address its tunnel
/// comes from; private addresses only when `private_allowed`.
pub fn believable_client(client: IpAddr, tunnel_from: IpAddr, private_allowed: bool) -> bool {
    match client_address_kind(client) {
        ClientAddressKind::Public => true,
        ClientAddressKind::Private => private_allowed,
        ClientAddressKind::Loopback => tunnel_from.to_canonical().is_loopback(),
        ClientAddressKind::Impossible => false,
    }
}

/// Classifies `ip` (an IPv4-mapped IPv6 address as its IPv4 address).
pub fn client_address_kind(ip: IpAddr) -> ClientAddressKind {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => ClientAddressKind::Loopback,
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => {
            ClientAddressKind::Impossible
        }
        IpAddr::V4(v4) if v4.is_private() || v4.is_link_local() || is_shared_v4(v4) => {
            ClientAddressKind::Private
        }
        IpAddr::V6(v6) if v6.is_loopback() => ClientAddressKind::Loopback,
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => ClientAddressKind::Impossible,
        IpAddr::V6(v6) if is_unique_local_v6(v6) || is_link_local_v6(v6) => {
            ClientAddressKind::Private
        }
        _ => ClientAddressKind::Public,
    }
}

/// Whether `ip` is a global unicast address: one an edge's public address can be.
pub fn is_global_unicast(ip: IpAddr) -> bool {
    if client_address_kind(ip) != ClientAddressKind::Public {
        return false;
    }
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(a == 0
                || a >= 240
                || v4.is_documentation()
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b & 0xfe) == 18))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            // Global unicast is 2000::/3, less documentation (2001:db8::/32).
            (first & 0xe000) == 0x2000 && !(first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// 100.64.0.0/10, shared by carrier-grade NATs.
fn is_shared_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (b & 0xc0) == 64
}

/// fc00::/7.
fn is_unique_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xfe00) == 0xfc00
}

/// fe80::/10.
fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn client_addresses_are_classified() {
        use ClientAddressKind::*;
        for (text, kind) in [
            ("127.0.0.1", Loopback),
            ("127.9.9.9", Loopback),
            ("0.0.0.0", Impossible),
            ("224.0.0.1", Impossible),
            ("255.255.255.255", Impossible),
            ("::1", Loopback),
            ("::", Impossible),
            ("ff02::1", Impossible),
            ("::ffff:127.0.0.1", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("192.168.1.1", Private),
            ("169.254.1.1", Private),
            ("100.64.0.1", Private),
            ("fd00::1", Private),
            ("fe80::1", Private),
            ("::ffff:10.0.0.1", Private),
            ("203.0.113.7", Public),
            ("8.8.8.8", Public),
            ("2606:4700::1111", Public),
            ("::ffff:8.8.8.8", Public),
        ] {
            assert_eq!(client_address_kind(ip(text)), kind, "{text}");
        }
    }

    #[test]
    fn loopback_clients_are_believed_only_from_an_edge_on_the_hub_host() {
        let remote_edge = ip("198.51.100.9");
        let local_edge = ip("127.0.0.1");
        assert!(believable_client(ip("8.8.8.8"), remote_edge, false));
        assert!(believable_client(ip("10.0.0.1"), remote_edge, true));
        assert!(!believable_client(ip("10.0.0.1"), remote_edge, false));
        assert!(!believable_client(ip("127.0.0.1"), remote_edge, true));
        assert!(!believable_client(ip("::1"), remote_edge, true));
        assert!(believable_client(ip("127.0.0.1"), local_edge, false));
        assert!(believable_client(ip("::1"), ip("::ffff:127.0.0.1"), false));
        for impossible in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(
                !believable_client(ip(impossible), local_edge, true),
                "{impossible}"
            );
        }
    }

    #[test]
    fn only_global_unicast_addresses_are_public_addresses() {
        for text in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.4.4"] {
            assert!(is_global_unicast(ip(text)), "{text}");
        }
        for text in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.0.1",
            "100.64.1.1",
            "169.254.0.1",
            "0.1.2.3",
            "240.0.0.1",
            "255.255.255.255",
            "224.1.1.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "192.0.0.8",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "64:ff9b::1",
        ] {
            assert!(!is_global_unicast(ip(text)), "{text}");
        }
    }
}
