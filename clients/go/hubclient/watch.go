package hubclient

import (
	"context"
	"fmt"
	"time"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// Filter narrows a watch; the zero value receives every event.
type Filter struct {
	// EdgeID keeps only this edge's events (auth failures, which have no edge, are then left out).
	EdgeID string
	// Kinds keeps only these kinds of event; all when empty. EventsMissed and Reconnected
	// notices always come.
	Kinds []EventKind
}

// request is the hub's form of the filter.
func (f Filter) request() (*pb.WatchEventsRequest, error) {
	request := &pb.WatchEventsRequest{EdgeId: f.EdgeID}
	for _, kind := range f.Kinds {
		wire, ok := eventKinds[kind]
		if !ok {
			return nil, fmt.Errorf("hubclient: a watch cannot be filtered by %q", kind)
		}
		request.Kinds = append(request.Kinds, wire)
	}
	return request, nil
}

// Backoff between resubscriptions: doubling from watchRetryMin to watchRetryMax.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 5 * time.Second
)

// Watch streams the hub's events until ctx ends, then closes the channel. When the stream
// breaks (the hub restarts, the network drops) it resubscribes with backoff and sends a
// Reconnected event once the new subscription is up. The first subscription is made before
// Watch returns, so its error (a wrong token, say) is returned directly.
func (c *Client) Watch(ctx context.Context, filter Filter) (<-chan Event, error) {
	request, err := filter.request()
	if err != nil {
		return nil, err
	}
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
				response, err := stream.Recv()
				if err != nil {
					break
				}
				retry = watchRetryMin
				event, known := eventFromProto(response)
				if known && !send(ctx, events, event) {
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
			if !send(ctx, events, Event{Kind: Reconnected, Time: time.Now()}) {
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
