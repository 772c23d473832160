package hubclient

import (
	"context"
	"time"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// Filter narrows a watch; the zero value receives every event.
type Filter struct {
	// EdgeID keeps only this edge's events (auth failures, which have no edge, are then left out).
	EdgeID string
	// Kinds keeps only these kinds of event; all when empty.
	Kinds []pb.EventKind
}

// Event is one hub event, or a notice that the watch had to resubscribe.
type Event struct {
	// WatchEventsResponse is the hub's event; nil on a Reconnected notice.
	*pb.WatchEventsResponse
	// Reconnected is set on the notice sent when the watch subscribed again after losing its
	// stream (for example across a hub restart): events in between were missed, so re-read
	// whatever state matters.
	Reconnected bool
}

// Backoff between resubscriptions: doubling from watchRetryMin to watchRetryMax.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 5 * time.Second
)

// Watch streams the hub's events until ctx ends, then closes the channel. When the stream
// breaks (the hub restarts, the network drops) it resubscribes with backoff and sends an Event
// with Reconnected set once the new subscription is up. The first subscription is made before
// Watch returns, so its error (a wrong token, say) is returned directly.
func (c *Client) Watch(ctx context.Context, filter Filter) (<-chan Event, error) {
	request := &pb.WatchEventsRequest{EdgeId: filter.EdgeID, Kinds: filter.Kinds}
	stream, err := c.subscribe(ctx, request)
	if err != nil {
		return nil, err
	}
	events := make(chan Event, 64)
	go func() {
		defer close(events)
		retry := watchRetryMin
		for {
			for {
				event, err := stream.Recv()
				if err != nil {
					break
				}
				retry = watchRetryMin
				if !send(ctx, events, Event{WatchEventsResponse: event}) {
					return
				}
			}
			for stream = nil; stream == nil; {
				select {
				case <-ctx.Done():
					return
				case <-time.After(retry):
				}
				retry = min(retry*2, watchRetryMax)
				stream, _ = c.subscribe(ctx, request)
			}
			if !send(ctx, events, Event{Reconnected: true}) {
				return
			}
		}
	}()
	return events, nil
}

// subscribe opens the event stream and waits for the hub's response headers, so that a
// returned stream is known to be live.
func (c *Client) subscribe(ctx context.Context, request *pb.WatchEventsRequest) (pb.HubAdmin_WatchEventsClient, error) {
	stream, err := c.admin.WatchEvents(ctx, request)
	if err != nil {
		return nil, wrap(err)
	}
	header, err := stream.Header()
	if err != nil {
		return nil, wrap(err)
	}
	if header == nil {
		// A trailers-only answer: the hub refused the call; Recv reports why.
		_, err := stream.Recv()
		return nil, wrap(err)
	}
	return stream, nil
}

func send(ctx context.Context, events chan<- Event, event Event) bool {
	select {
	case events <- event:
		return true
	case <-ctx.Done():
		return false
	}
}
