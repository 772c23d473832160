package hubclient_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/remoteingress/remoteingress/clients/go/hubclient"
)

// recorder keeps every event a watch delivers.
type recorder struct {
	mu     sync.Mutex
	events []hubclient.Event
}

func record(events <-chan hubclient.Event) *recorder {
	r := &recorder{}
	go func() {
		for event := range events {
			r.mu.Lock()
			r.events = append(r.events, event)
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *recorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// seen reports whether an event after mark matches.
func (r *recorder) seen(mark int, match func(hubclient.Event) bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(r.events[mark:], match)
}

// first is the first event after mark that matches, if any.
func (r *recorder) first(mark int, match func(hubclient.Event) bool) (hubclient.Event, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := slices.IndexFunc(r.events[mark:], match)
	if i < 0 {
		return hubclient.Event{}, false
	}
	return r.events[mark+i], true
}

func connected(id string) func(hubclient.Event) bool {
	return func(e hubclient.Event) bool { return e.Kind == hubclient.EdgeConnected && e.EdgeID == id }
}

func disconnected(id string) func(hubclient.Event) bool {
	return func(e hubclient.Event) bool { return e.Kind == hubclient.EdgeDisconnected && e.EdgeID == id }
}

func reconnected(e hubclient.Event) bool { return e.Kind == hubclient.Reconnected }

// TestEveryRPCAgainstARealHub drives a hub process and an edge process through the client.
func TestEveryRPCAgainstARealHub(t *testing.T) {
	ctx := testContext(t)
	h := startHub(t)
	client, err := hubclient.Dial(ctx, h.address(), hubclient.WithToken(adminToken))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	events, err := client.Watch(ctx, hubclient.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	recorded := record(events)

	const secret = "s3cr3t"
	port := freePort(t, edgeIP)
	if err := client.UpdateAllowedEdges(ctx, []hubclient.EdgeSpec{{ID: "e1", Secret: secret, ListenPorts: []uint32{uint32(port)}}}); err != nil {
		t.Fatal(err)
	}
	created, err := client.CreateConnectionToken(ctx, "e1", "")
	if err != nil {
		t.Fatal(err)
	}
	token, err := hubclient.DecodeConnectionToken(created.Token)
	if err != nil || token.EdgeID != "e1" || token.Secret != secret || int(token.HubPort) != h.tunnelPort || token.Pin != created.Pin {
		t.Fatalf("token %+v, %v", token, err)
	}
	edge := startEdge(t, created.Token)
	eventually(t, says("an EdgeConnected event"), func() bool { return recorded.seen(0, connected("e1")) })
	eventually(t, says("the edge to listen on its port"), func() bool {
		return accepts(net.JoinHostPort(edgeIP, strconv.Itoa(port)))
	})

	t.Run("GetStatus shows the connected edge", func(t *testing.T) {
		status, err := client.GetStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !status.Running || status.TunnelPort != h.tunnelPort || len(status.ConnectedEdges) != 1 ||
			status.ConnectedEdges[0].EdgeID != "e1" || status.ConnectedEdges[0].Transport != "tcpTls" ||
			status.ConnectedEdges[0].ConnectedSince.IsZero() {
			t.Fatalf("status %+v", status)
		}
		// Plain values: the status marshals as the original system's JSON shape.
		encoded, err := json.Marshal(status)
		if err != nil || !strings.Contains(string(encoded), `"connectedEdges":[{"edgeId":"e1"`) {
			t.Fatalf("status as JSON: %s, %v", encoded, err)
		}
	})

	t.Run("Watch gives plain events, filtered by kind when asked", func(t *testing.T) {
		if _, err := client.Watch(ctx, hubclient.Filter{Kinds: []hubclient.EventKind{hubclient.Reconnected}}); err == nil {
			t.Fatal("a filter by a kind the hub does not send was accepted")
		}
		onlyOpened, err := client.Watch(ctx, hubclient.Filter{EdgeID: "e1", Kinds: []hubclient.EventKind{hubclient.StreamOpened}})
		if err != nil {
			t.Fatal(err)
		}
		filtered := record(onlyOpened)
		mark := recorded.mark()
		// Nothing listens at the target: the hub reports the stream, fails to connect, closes it.
		conn, err := net.Dial("tcp", net.JoinHostPort(edgeIP, strconv.Itoa(port)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		opened := func(e hubclient.Event) bool { return e.Kind == hubclient.StreamOpened }
		eventually(t, says("a StreamOpened event"), func() bool { return recorded.seen(mark, opened) })
		event, _ := recorded.first(mark, opened)
		if event.EdgeID != "e1" || event.EdgePort != uint32(port) || event.StreamID == 0 || event.Time.IsZero() ||
			!strings.HasSuffix(event.Target, ":"+strconv.Itoa(port)) || !strings.HasPrefix(event.ClientAddr, "127.0.0.1:") {
			t.Fatalf("stream opened: %+v", event)
		}
		encoded, err := json.Marshal(event)
		if err != nil || !strings.Contains(string(encoded), `"kind":"streamOpened",`) ||
			!strings.Contains(string(encoded), fmt.Sprintf(`"edgePort":%d,`, port)) || strings.Contains(string(encoded), `"version"`) {
			t.Fatalf("event as JSON: %s, %v", encoded, err)
		}
		closed := func(e hubclient.Event) bool { return e.Kind == hubclient.StreamClosed && e.StreamID == event.StreamID }
		eventually(t, says("its StreamClosed event"), func() bool { return recorded.seen(mark, closed) })
		eventually(t, says("the filtered watch's StreamOpened"), func() bool { return filtered.seen(0, opened) })
		if other, found := filtered.first(0, func(e hubclient.Event) bool { return !opened(e) }); found {
			t.Fatalf("the filtered watch got another kind: %+v", other)
		}
	})

	t.Run("ListEdges shows the edge without its secret", func(t *testing.T) {
		edges, err := client.ListEdges(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(edges) != 1 || edges[0].ID != "e1" || !slices.Equal(edges[0].ListenPorts, []uint32{uint32(port)}) {
			t.Fatalf("edges %v", edges)
		}
	})

	t.Run("the shared edge vectors: valid ones are accepted, invalid ones are typed errors and change nothing", func(t *testing.T) {
		before, err := client.ListEdges(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i, vector := range loadVectors(t).Edges {
			var spec hubclient.EdgeSpec
			if err := json.Unmarshal(vector.Edge, &spec); err != nil {
				t.Fatalf("%s: %v", vector.Name, err)
			}
			// Own ids, so that the vectors never replace the connected edge e1.
			spec.ID = fmt.Sprintf("vector-%d", i)
			if vector.Valid {
				if err := client.UpsertEdge(ctx, spec); err != nil {
					t.Fatalf("%s: %v", vector.Name, err)
				}
				listed, err := client.ListEdges(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, edge := range listed {
					if edge.ID == spec.ID && len(edge.TargetHosts) != len(spec.TargetHosts) {
						t.Errorf("%s: target hosts %v, sent %v", vector.Name, edge.TargetHosts, spec.TargetHosts)
					}
					if edge.ID == spec.ID && !sameFirewallWords(edge.FirewallConfig, spec.FirewallConfig) {
						t.Errorf("%s: firewall %+v, sent %+v", vector.Name, edge.FirewallConfig, spec.FirewallConfig)
					}
				}
				if deleted, err := client.DeleteEdge(ctx, spec.ID); !deleted || err != nil {
					t.Fatalf("%s: delete %v, %v", vector.Name, deleted, err)
				}
				continue
			}
			// A full replacement that would drop e1: rejected as a whole, so e1 stays.
			err := client.UpdateAllowedEdges(ctx, []hubclient.EdgeSpec{spec})
			var rejected *hubclient.Error
			if !errors.As(err, &rejected) || rejected.Code != codes.InvalidArgument || rejected.EdgeID != spec.ID || rejected.Field != vector.Field {
				t.Errorf("%s: got %#v, want InvalidArgument on %s", vector.Name, err, vector.Field)
			}
		}
		after, err := client.ListEdges(ctx)
		if err != nil || len(after) != len(before) || after[0].ID != "e1" {
			t.Fatalf("edges changed: %v, %v", after, err)
		}
		if deleted, err := client.DeleteEdge(ctx, "no-such-edge"); deleted || err != nil {
			t.Fatalf("deleting an unknown edge: %v, %v", deleted, err)
		}
	})

	t.Run("a wrong admin token is Unauthenticated", func(t *testing.T) {
		intruder, err := hubclient.Dial(ctx, h.address(), hubclient.WithToken("wrong"))
		if err != nil {
			t.Fatal(err)
		}
		defer intruder.Close()
		if _, err := intruder.GetStatus(ctx); !hubclient.IsCode(err, codes.Unauthenticated) {
			t.Fatalf("got %v", err)
		}
		if _, err := intruder.Watch(ctx, hubclient.Filter{}); !hubclient.IsCode(err, codes.Unauthenticated) {
			t.Fatalf("watch: got %v", err)
		}
	})

	t.Run("DisconnectEdge drops the tunnel and the edge comes back", func(t *testing.T) {
		mark := recorded.mark()
		if ok, err := client.DisconnectEdge(ctx, "e1"); !ok || err != nil {
			t.Fatalf("disconnect: %v, %v", ok, err)
		}
		eventually(t, says("EdgeDisconnected"), func() bool { return recorded.seen(mark, disconnected("e1")) })
		eventually(t, says("EdgeConnected again"), func() bool { return recorded.seen(mark, connected("e1")) })
	})

	t.Run("the watch survives a hub restart", func(t *testing.T) {
		mark := recorded.mark()
		h.restart()
		eventually(t, says("a Reconnected notice"), func() bool { return recorded.seen(mark, reconnected) })
		// The edge may have reconnected before the watch resubscribed (that gap is what the
		// notice announces); events after the resubscription arrive on the same channel.
		eventually(t, func() string { return "e1 back\n--- hub:\n" + h.process.String() + "\n--- edge:\n" + edge.String() }, func() bool {
			status, err := client.GetStatus(ctx)
			return err == nil && len(status.ConnectedEdges) == 1
		})
		resubscribed := recorded.mark()
		if ok, err := client.DisconnectEdge(ctx, "e1"); !ok || err != nil {
			t.Fatalf("disconnect: %v, %v", ok, err)
		}
		eventually(t, says("EdgeDisconnected after the restart"), func() bool { return recorded.seen(resubscribed, disconnected("e1")) })
		eventually(t, says("EdgeConnected after the restart"), func() bool { return recorded.seen(resubscribed, connected("e1")) })
	})

	t.Run("DrainEdge moves the edge to a new tunnel; Drain stops the hub taking tunnels", func(t *testing.T) {
		mark := recorded.mark()
		if ok, err := client.DrainEdge(ctx, "e1"); !ok || err != nil {
			t.Fatalf("drain edge: %v, %v", ok, err)
		}
		eventually(t, says("the drained tunnel to close"), func() bool { return recorded.seen(mark, disconnected("e1")) })
		eventually(t, says("a replacement tunnel"), func() bool { return recorded.seen(mark, connected("e1")) })
		if _, err := client.Drain(ctx); err != nil {
			t.Fatal(err)
		}
		status, err := client.GetStatus(ctx)
		if err != nil || !status.Draining || status.HubID == "" {
			t.Fatalf("status after Drain: %v, %v", status, err)
		}
	})
}

// sameFirewallWords reports whether two firewall configs have the same rate limits and rules,
// with the same protocol, direction and action words (the hub may normalise rates).
func sameFirewallWords(got, sent *hubclient.FirewallSpec) bool {
	if got == nil || sent == nil {
		return (got == nil || len(got.RateLimits)+len(got.Rules)+len(got.BlockedIPs) == 0) &&
			(sent == nil || len(sent.RateLimits)+len(sent.Rules)+len(sent.BlockedIPs) == 0)
	}
	if len(got.RateLimits) != len(sent.RateLimits) || len(got.Rules) != len(sent.Rules) {
		return false
	}
	for i, limit := range got.RateLimits {
		if limit.ID != sent.RateLimits[i].ID || limit.Protocol != sent.RateLimits[i].Protocol {
			return false
		}
	}
	for i, rule := range got.Rules {
		want := sent.Rules[i]
		if rule.ID != want.ID || rule.Direction != want.Direction || rule.Action != want.Action || rule.Protocol != want.Protocol {
			return false
		}
	}
	return true
}
