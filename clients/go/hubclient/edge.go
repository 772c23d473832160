package hubclient

import (
	"encoding/json"
	"fmt"

	"google.golang.org/grpc/codes"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// EdgeSpec is an edge the hub admits, in the JSON shape of the original system and of the hub's
// edges file (`listenPorts`, `firewallConfig`, `perSourceIP`, ...), so the same documents work
// everywhere.
type EdgeSpec struct {
	// ID is the edge id, [A-Za-z0-9._-]{1,128}.
	ID string `json:"id"`
	// Secret is the edge's shared secret (empty in what ListEdges returns).
	Secret string `json:"secret,omitempty"`
	// ListenPorts are the TCP ports the edge listens on.
	ListenPorts []uint32 `json:"listenPorts,omitempty"`
	// ListenPortsUDP are the UDP ports the edge listens on.
	ListenPortsUDP []uint32 `json:"listenPortsUdp,omitempty"`
	// TargetPorts maps an edge port to the target port, where they differ.
	TargetPorts map[uint32]uint32 `json:"targetPorts,omitempty"`
	// TargetHosts maps an edge port to its own target host (a Service's cluster IP, say), where
	// it is not the hub's target host.
	TargetHosts map[uint32]string `json:"targetHosts,omitempty"`
	// StunIntervalSecs is the STUN refresh interval; 0 means the default (300).
	StunIntervalSecs uint64 `json:"stunIntervalSecs,omitempty"`
	// Generation orders configurations across hubs (edges apply only a newer one); nil lets the
	// hub count changes itself. Hubs run as replicas require it.
	Generation *uint64 `json:"generation,omitempty"`
	// FirewallConfig holds the nftables rules the edge applies.
	FirewallConfig *FirewallSpec `json:"firewallConfig,omitempty"`
}

// FirewallSpec is an edge's firewall configuration.
type FirewallSpec struct {
	// BlockedIPs are addresses or CIDRs dropped on input.
	BlockedIPs []string `json:"blockedIps,omitempty"`
	// RateLimits are per-port rate limits.
	RateLimits []RateLimitSpec `json:"rateLimits,omitempty"`
	// Rules are explicit rules.
	Rules []RuleSpec `json:"rules,omitempty"`
}

// RateLimitSpec limits the packet rate to one destination port.
type RateLimitSpec struct {
	// ID is unique within the config.
	ID string `json:"id"`
	// Port is the destination port.
	Port uint32 `json:"port"`
	// Protocol is "tcp", "udp" or empty for both.
	Protocol string `json:"protocol,omitempty"`
	// Rate is "N/second", "N/minute" or "N/hour".
	Rate string `json:"rate"`
	// Burst is the number of packets allowed above the rate; nil for none.
	Burst *uint32 `json:"burst,omitempty"`
	// PerSourceIP limits each source address separately.
	PerSourceIP bool `json:"perSourceIP,omitempty"`
}

// RuleSpec is an explicit firewall rule.
type RuleSpec struct {
	// ID is unique within the config.
	ID string `json:"id"`
	// Direction is "input", "output" or "forward".
	Direction string `json:"direction"`
	// Action is "accept", "drop" or "reject".
	Action string `json:"action"`
	// SourceIP is an address or CIDR to match; empty matches any.
	SourceIP string `json:"sourceIP,omitempty"`
	// DestPort is the destination port to match; nil matches any.
	DestPort *uint32 `json:"destPort,omitempty"`
	// Protocol is "tcp", "udp" or empty for any.
	Protocol string `json:"protocol,omitempty"`
	// Comment is free text kept with the rule.
	Comment string `json:"comment,omitempty"`
}

// ParseEdgeSpecs reads a JSON array of edges in the edges-file shape.
func ParseEdgeSpecs(data []byte) ([]EdgeSpec, error) {
	var edges []EdgeSpec
	if err := json.Unmarshal(data, &edges); err != nil {
		return nil, fmt.Errorf("hubclient: edges JSON: %w", err)
	}
	return edges, nil
}

// Proto converts the edge to the API message. Unknown protocol, direction or action words are
// errors here; everything else is validated by the hub.
func (e EdgeSpec) Proto() (*pb.Edge, error) {
	edge := &pb.Edge{
		Id:               e.ID,
		Secret:           e.Secret,
		ListenPorts:      e.ListenPorts,
		ListenPortsUdp:   e.ListenPortsUDP,
		TargetPorts:      e.TargetPorts,
		TargetHosts:      e.TargetHosts,
		StunIntervalSecs: e.StunIntervalSecs,
		Generation:       e.Generation,
	}
	if e.FirewallConfig == nil {
		return edge, nil
	}
	firewall := &pb.FirewallConfig{BlockedIps: e.FirewallConfig.BlockedIPs}
	for i, limit := range e.FirewallConfig.RateLimits {
		protocol, err := protocolFrom(limit.Protocol, e.ID, fmt.Sprintf("firewallConfig.rateLimits[%d].protocol", i))
		if err != nil {
			return nil, err
		}
		firewall.RateLimits = append(firewall.RateLimits, &pb.RateLimit{
			Id: limit.ID, Port: limit.Port, Protocol: protocol, Rate: limit.Rate,
			Burst: limit.Burst, PerSourceIp: limit.PerSourceIP,
		})
	}
	for i, rule := range e.FirewallConfig.Rules {
		field := fmt.Sprintf("firewallConfig.rules[%d]", i)
		protocol, err := protocolFrom(rule.Protocol, e.ID, field+".protocol")
		if err != nil {
			return nil, err
		}
		direction, ok := directions[rule.Direction]
		if !ok {
			return nil, invalidWord(e.ID, field+".direction", rule.Direction, "input, output or forward")
		}
		action, ok := actions[rule.Action]
		if !ok {
			return nil, invalidWord(e.ID, field+".action", rule.Action, "accept, drop or reject")
		}
		firewall.Rules = append(firewall.Rules, &pb.FirewallRule{
			Id: rule.ID, Direction: direction, Action: action, SourceIp: rule.SourceIP,
			DestPort: rule.DestPort, Protocol: protocol, Comment: rule.Comment,
		})
	}
	edge.FirewallConfig = firewall
	return edge, nil
}

var (
	protocols  = map[string]pb.Protocol{"": pb.Protocol_PROTOCOL_UNSPECIFIED, "tcp": pb.Protocol_PROTOCOL_TCP, "udp": pb.Protocol_PROTOCOL_UDP}
	directions = map[string]pb.Direction{"input": pb.Direction_DIRECTION_INPUT, "output": pb.Direction_DIRECTION_OUTPUT, "forward": pb.Direction_DIRECTION_FORWARD}
	actions    = map[string]pb.Action{"accept": pb.Action_ACTION_ACCEPT, "drop": pb.Action_ACTION_DROP, "reject": pb.Action_ACTION_REJECT}
)

func protocolFrom(word, edgeID, field string) (pb.Protocol, error) {
	protocol, ok := protocols[word]
	if !ok {
		return 0, invalidWord(edgeID, field, word, "tcp, udp or empty")
	}
	return protocol, nil
}

func invalidWord(edgeID, field, word, expected string) error {
	return &Error{
		Code:    codes.InvalidArgument,
		Message: fmt.Sprintf("edge %q: %s: %q is not one of %s", edgeID, field, word, expected),
		EdgeID:  edgeID,
		Field:   field,
	}
}
