package hubclient

import (
	"time"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// Status is the hub's running state and its tunnels, as GetStatus returns it.
type Status struct {
	// Running is true until the hub shuts down.
	Running bool `json:"running"`
	// TunnelPort is the port edges connect to.
	TunnelPort int `json:"tunnelPort"`
	// ConnectedEdges are the tunnels that are up (an edge with tunnels to several hubs may
	// reach this one twice).
	ConnectedEdges []ConnectedEdge `json:"connectedEdges"`
	// HubID is this hub instance's id, as edges see it.
	HubID string `json:"hubId"`
	// Draining is true once the hub has begun draining.
	Draining bool `json:"draining"`
}

// ConnectedEdge is one edge's tunnel to the hub.
type ConnectedEdge struct {
	// EdgeID is the edge's id.
	EdgeID string `json:"edgeId"`
	// ConnectedSince is when the tunnel came up.
	ConnectedSince time.Time `json:"connectedSince"`
	// RemoteAddr is the address the edge connected from.
	RemoteAddr string `json:"remoteAddr"`
	// Transport is "tcpTls" or "quic".
	Transport string `json:"transport"`
	// ActiveStreams counts the TCP streams open now.
	ActiveStreams int `json:"activeStreams"`
	// ActiveUDPSessions counts the UDP sessions open now.
	ActiveUDPSessions int `json:"activeUdpSessions"`
	// BytesIn counts payload bytes received from the edge.
	BytesIn uint64 `json:"bytesIn"`
	// BytesOut counts payload bytes sent to the edge.
	BytesOut uint64 `json:"bytesOut"`
	// PublicIP is the address the edge discovered by STUN; empty if unknown.
	PublicIP string `json:"publicIp"`
	// RTT is the last PING round trip; zero until measured.
	RTT time.Duration `json:"rtt"`
}

// CreatedToken is a connection token and what it carries, as CreateConnectionToken returns it.
type CreatedToken struct {
	// Token is the value for `remoteingress edge --token`.
	Token string `json:"token"`
	// HubHost is the hub host in the token.
	HubHost string `json:"hubHost"`
	// HubPort is the hub port in the token.
	HubPort int `json:"hubPort"`
	// Pin is the certificate pin in the token.
	Pin string `json:"pin"`
}

// transportName is the original system's name of a transport: "tcpTls", "quic", or "" when
// not set.
func transportName(transport pb.Transport) string {
	switch transport {
	case pb.Transport_TRANSPORT_TCP_TLS:
		return "tcpTls"
	case pb.Transport_TRANSPORT_QUIC:
		return "quic"
	default:
		return ""
	}
}

func statusFromProto(response *pb.GetStatusResponse) Status {
	status := Status{
		Running:        response.GetRunning(),
		TunnelPort:     int(response.GetTunnelPort()),
		ConnectedEdges: make([]ConnectedEdge, 0, len(response.GetConnectedEdges())),
		HubID:          response.GetHubId(),
		Draining:       response.GetDraining(),
	}
	for _, edge := range response.GetConnectedEdges() {
		connected := ConnectedEdge{
			EdgeID:            edge.GetId(),
			RemoteAddr:        edge.GetRemoteAddr(),
			Transport:         transportName(edge.GetTransport()),
			ActiveStreams:     int(edge.GetActiveStreams()),
			ActiveUDPSessions: int(edge.GetActiveUdpSessions()),
			BytesIn:           edge.GetBytesIn(),
			BytesOut:          edge.GetBytesOut(),
			PublicIP:          edge.GetPublicIp(),
		}
		if since := edge.GetConnectedSince(); since != nil {
			connected.ConnectedSince = since.AsTime()
		}
		if rtt := edge.GetRtt(); rtt != nil {
			connected.RTT = rtt.AsDuration()
		}
		status.ConnectedEdges = append(status.ConnectedEdges, connected)
	}
	return status
}

// EdgeState is a configured edge, its Secret left empty (the hub never returns it), and its
// connection and config state, as ListEdges returns it.
type EdgeState struct {
	EdgeSpec
	// Connected is true while the edge has a tunnel to this hub.
	Connected bool `json:"connected"`
	// DesiredConfigVersion is the version of the configuration the hub wants the edge to run.
	DesiredConfigVersion uint64 `json:"desiredConfigVersion"`
	// AppliedConfigVersion is the version the edge acknowledged.
	AppliedConfigVersion uint64 `json:"appliedConfigVersion"`
	// LastConfigError is why the edge last refused a configuration; empty if it did not.
	LastConfigError string `json:"lastConfigError,omitempty"`
}

func edgeStateFromProto(info *pb.EdgeInfo) EdgeState {
	generation := info.GetGeneration()
	return EdgeState{
		EdgeSpec: EdgeSpec{
			ID:               info.GetId(),
			ListenPorts:      info.GetListenPorts(),
			ListenPortsUDP:   info.GetListenPortsUdp(),
			TargetPorts:      info.GetTargetPorts(),
			TargetHosts:      info.GetTargetHosts(),
			StunIntervalSecs: info.GetStunIntervalSecs(),
			Generation:       &generation,
			FirewallConfig:   firewallFromProto(info.GetFirewallConfig()),
		},
		Connected:            info.GetConnected(),
		DesiredConfigVersion: info.GetDesiredConfigVersion(),
		AppliedConfigVersion: info.GetAppliedConfigVersion(),
		LastConfigError:      info.GetLastConfigError(),
	}
}

func firewallFromProto(firewall *pb.FirewallConfig) *FirewallSpec {
	if firewall == nil {
		return nil
	}
	spec := &FirewallSpec{BlockedIPs: firewall.GetBlockedIps()}
	for _, limit := range firewall.GetRateLimits() {
		spec.RateLimits = append(spec.RateLimits, RateLimitSpec{
			ID: limit.GetId(), Port: limit.GetPort(), Protocol: wordFor(protocols, limit.GetProtocol()),
			Rate: limit.GetRate(), Burst: limit.Burst, PerSourceIP: limit.GetPerSourceIp(),
		})
	}
	for _, rule := range firewall.GetRules() {
		spec.Rules = append(spec.Rules, RuleSpec{
			ID: rule.GetId(), Direction: wordFor(directions, rule.GetDirection()),
			Action: wordFor(actions, rule.GetAction()), SourceIP: rule.GetSourceIp(),
			DestPort: rule.DestPort, Protocol: wordFor(protocols, rule.GetProtocol()), Comment: rule.GetComment(),
		})
	}
	return spec
}

// wordFor is the word that words maps to value; "" if none does.
func wordFor[V comparable](words map[string]V, value V) string {
	for word, v := range words {
		if v == value {
			return word
		}
	}
	return ""
}
