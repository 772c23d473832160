package hubclient

import (
	"time"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// EventKind names what an Event reports; the names are those of the TypeScript client's events.
type EventKind string

// The kinds of Event.
const (
	// EdgeConnected: an edge authenticated and its tunnel is up (RemoteAddr, Transport).
	EdgeConnected EventKind = "edgeConnected"
	// EdgeDisconnected: an edge's tunnel ended (Reason).
	EdgeDisconnected EventKind = "edgeDisconnected"
	// StreamOpened: a tunnelled TCP connection started (StreamID, ClientAddr, EdgePort, Target).
	StreamOpened EventKind = "streamOpened"
	// StreamClosed: a tunnelled TCP connection ended (StreamID).
	StreamClosed EventKind = "streamClosed"
	// UDPSessionOpened: a UDP session started (SessionID, ClientAddr, EdgePort, Target).
	UDPSessionOpened EventKind = "udpSessionOpened"
	// UDPSessionClosed: a UDP session ended (SessionID).
	UDPSessionClosed EventKind = "udpSessionClosed"
	// ConfigPushed: a configuration was sent to an edge (Version).
	ConfigPushed EventKind = "configPushed"
	// ConfigApplied: an edge acknowledged a configuration (Version; Error if it kept its
	// previous one).
	ConfigApplied EventKind = "configApplied"
	// AuthFailed: a tunnel connection failed to authenticate (RemoteAddr, Reason, AuthFailure).
	AuthFailed EventKind = "authFailed"
	// OpenRefused: an edge asked for a port it is not assigned; nothing was connected
	// (Protocol, Port).
	OpenRefused EventKind = "openRefused"
	// ConfigReloaded: the hub's edges file changed and was applied, or rejected with Error
	// (the hub keeps its previous edges) (Path, Digest, Generation, Edges, Error).
	ConfigReloaded EventKind = "configReloaded"
	// EventsMissed: this watcher was too slow and the hub dropped Count events for it.
	EventsMissed EventKind = "eventsMissed"
	// Reconnected: the watch subscribed again after losing its stream (a hub restart, say);
	// events in between were missed, so re-read whatever state matters. Only Kind is set.
	Reconnected EventKind = "watchReconnected"
)

// Event is one hub event, or a Reconnected notice. Kind says which of the other fields are set
// (see the EventKind constants); the rest are zero and left out of JSON.
type Event struct {
	// Kind is what happened.
	Kind EventKind `json:"kind"`
	// Time is when the hub saw it.
	Time time.Time `json:"time"`
	// EdgeID is the edge concerned; empty for AuthFailed, ConfigReloaded, EventsMissed and
	// Reconnected.
	EdgeID string `json:"edgeId,omitempty"`
	// RemoteAddr is the tunnel connection's source address.
	RemoteAddr string `json:"remoteAddr,omitempty"`
	// Transport is "tcpTls" or "quic".
	Transport string `json:"transport,omitempty"`
	// Reason says why a tunnel ended or failed to authenticate.
	Reason string `json:"reason,omitempty"`
	// AuthFailure is the stable label of an authentication failure, as in the metric
	// auth_failures_total: bad_credentials, malformed, timeout, tls, limit, rate_limited,
	// evicted, abandoned, full or busy.
	AuthFailure string `json:"authFailure,omitempty"`
	// StreamID is the stream's id within its tunnel.
	StreamID uint32 `json:"streamId,omitempty"`
	// SessionID is the UDP session's id within its tunnel.
	SessionID uint32 `json:"sessionId,omitempty"`
	// ClientAddr is the client's address, from the edge's PROXY header.
	ClientAddr string `json:"clientAddr,omitempty"`
	// EdgePort is the edge port the client reached.
	EdgePort uint32 `json:"edgePort,omitempty"`
	// Target is where the hub forwards the stream or session, host:port.
	Target string `json:"target,omitempty"`
	// Version is the configuration's version.
	Version uint64 `json:"version,omitempty"`
	// Error is why an edge could not apply a configuration.
	Error string `json:"error,omitempty"`
	// Protocol is "tcp" or "udp".
	Protocol string `json:"protocol,omitempty"`
	// Port is the port a refused open named.
	Port uint32 `json:"port,omitempty"`
	// Count is how many events were missed.
	Count uint64 `json:"count,omitempty"`
	// Path is the edges file.
	Path string `json:"path,omitempty"`
	// Digest is the SHA-256 of the edges file's content, in hex.
	Digest string `json:"digest,omitempty"`
	// Generation is the edges file's generation, if it names one.
	Generation *uint64 `json:"generation,omitempty"`
	// Edges is how many edges the edges file lists.
	Edges uint32 `json:"edges,omitempty"`
}

// eventKinds maps the kinds a Filter names to the hub's.
var eventKinds = map[EventKind]pb.EventKind{
	EdgeConnected:    pb.EventKind_EVENT_KIND_EDGE_CONNECTED,
	EdgeDisconnected: pb.EventKind_EVENT_KIND_EDGE_DISCONNECTED,
	StreamOpened:     pb.EventKind_EVENT_KIND_STREAM_OPENED,
	StreamClosed:     pb.EventKind_EVENT_KIND_STREAM_CLOSED,
	UDPSessionOpened: pb.EventKind_EVENT_KIND_UDP_SESSION_OPENED,
	UDPSessionClosed: pb.EventKind_EVENT_KIND_UDP_SESSION_CLOSED,
	ConfigPushed:     pb.EventKind_EVENT_KIND_CONFIG_PUSHED,
	ConfigApplied:    pb.EventKind_EVENT_KIND_CONFIG_APPLIED,
	AuthFailed:       pb.EventKind_EVENT_KIND_AUTH_FAILED,
	OpenRefused:      pb.EventKind_EVENT_KIND_OPEN_REFUSED,
	ConfigReloaded:   pb.EventKind_EVENT_KIND_CONFIG_RELOADED,
}

// eventFromProto is the plain form of one of the hub's events; ok is false for a kind this
// client does not know (a newer hub's), which the watch skips.
func eventFromProto(response *pb.WatchEventsResponse) (event Event, ok bool) {
	event = Event{Time: response.GetTime().AsTime(), EdgeID: response.GetEdgeId()}
	switch e := response.GetEvent().(type) {
	case *pb.WatchEventsResponse_EdgeConnected:
		event.Kind = EdgeConnected
		event.RemoteAddr = e.EdgeConnected.GetRemoteAddr()
		event.Transport = transportName(e.EdgeConnected.GetTransport())
	case *pb.WatchEventsResponse_EdgeDisconnected:
		event.Kind = EdgeDisconnected
		event.Reason = e.EdgeDisconnected.GetReason()
	case *pb.WatchEventsResponse_StreamOpened:
		event.Kind = StreamOpened
		event.StreamID = e.StreamOpened.GetStreamId()
		event.ClientAddr = e.StreamOpened.GetClientAddr()
		event.EdgePort = e.StreamOpened.GetEdgePort()
		event.Target = e.StreamOpened.GetTarget()
	case *pb.WatchEventsResponse_StreamClosed:
		event.Kind = StreamClosed
		event.StreamID = e.StreamClosed.GetStreamId()
	case *pb.WatchEventsResponse_UdpSessionOpened:
		event.Kind = UDPSessionOpened
		event.SessionID = e.UdpSessionOpened.GetSessionId()
		event.ClientAddr = e.UdpSessionOpened.GetClientAddr()
		event.EdgePort = e.UdpSessionOpened.GetEdgePort()
		event.Target = e.UdpSessionOpened.GetTarget()
	case *pb.WatchEventsResponse_UdpSessionClosed:
		event.Kind = UDPSessionClosed
		event.SessionID = e.UdpSessionClosed.GetSessionId()
	case *pb.WatchEventsResponse_ConfigPushed:
		event.Kind = ConfigPushed
		event.Version = e.ConfigPushed.GetVersion()
	case *pb.WatchEventsResponse_ConfigApplied:
		event.Kind = ConfigApplied
		event.Version = e.ConfigApplied.GetVersion()
		event.Error = e.ConfigApplied.GetError()
	case *pb.WatchEventsResponse_AuthFailed:
		event.Kind = AuthFailed
		event.RemoteAddr = e.AuthFailed.GetRemoteAddr()
		event.Reason = e.AuthFailed.GetReason()
		event.AuthFailure = e.AuthFailed.GetKind()
	case *pb.WatchEventsResponse_OpenRefused:
		event.Kind = OpenRefused
		event.Protocol = e.OpenRefused.GetProtocol()
		event.Port = e.OpenRefused.GetPort()
	case *pb.WatchEventsResponse_ConfigReloaded:
		event.Kind = ConfigReloaded
		event.Path = e.ConfigReloaded.GetPath()
		event.Digest = e.ConfigReloaded.GetDigest()
		event.Generation = e.ConfigReloaded.Generation
		event.Edges = e.ConfigReloaded.GetEdges()
		event.Error = e.ConfigReloaded.GetError()
	case *pb.WatchEventsResponse_EventsMissed:
		event.Kind = EventsMissed
		event.Count = e.EventsMissed.GetCount()
	default:
		return Event{}, false
	}
	return event, true
}
