// Package hubclient is a thin, idiomatic Go client for the remoteingress hub admin API
// (remoteingress.v1.HubAdmin): dial with a bearer token, call every RPC with plain Go values,
// and watch the hub's events over a stream that survives hub restarts.
package hubclient

import (
	"context"
	"crypto/tls"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/remoteingress/remoteingress/clients/go/gen/remoteingress/v1"
)

// Option configures Dial.
type Option func(*options)

type options struct {
	token       string
	tls         *tls.Config
	dialOptions []grpc.DialOption
}

// WithToken sends `authorization: Bearer <token>` with every call (the hub's admin token).
func WithToken(token string) Option {
	return func(o *options) { o.token = token }
}

// WithTLS connects over TLS with the given configuration (the hub's --admin-tls-cert).
// Without it the connection is plaintext HTTP/2, as the hub's loopback default expects.
func WithTLS(config *tls.Config) Option {
	return func(o *options) { o.tls = config }
}

// WithDialOptions passes extra options to grpc.NewClient (interceptors, keepalive, ...).
func WithDialOptions(dialOptions ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, dialOptions...) }
}

// Client calls one hub's admin API. It is safe for concurrent use.
type Client struct {
	conn  *grpc.ClientConn
	admin pb.HubAdminClient
}

// Dial connects to the hub admin API at addr (host:port) and waits until the connection is up
// or ctx ends.
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	transport := insecure.NewCredentials()
	if o.tls != nil {
		transport = credentials.NewTLS(o.tls)
	}
	dialOptions := append([]grpc.DialOption{grpc.WithTransportCredentials(transport)}, o.dialOptions...)
	if o.token != "" {
		dialOptions = append(dialOptions, grpc.WithPerRPCCredentials(bearer{token: o.token, secure: o.tls != nil}))
	}
	conn, err := grpc.NewClient(addr, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("hubclient: %s: %w", addr, err)
	}
	if err := waitReady(ctx, conn); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("hubclient: %s: %w", addr, err)
	}
	return &Client{conn: conn, admin: pb.NewHubAdminClient(conn)}, nil
}

func waitReady(ctx context.Context, conn *grpc.ClientConn) error {
	conn.Connect()
	for {
		state := conn.GetState()
		if state == connectivity.Ready {
			return nil
		}
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("not reachable (%s): %w", state, ctx.Err())
		}
	}
}

// Close ends the connection; calls and watches in progress fail.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Raw is the generated client, for anything the helpers do not cover.
func (c *Client) Raw() pb.HubAdminClient {
	return c.admin
}

// UpdateAllowedEdges replaces the whole allowed-edge set. One invalid edge rejects the call
// (an *Error with code InvalidArgument naming the edge and field) and nothing changes.
func (c *Client) UpdateAllowedEdges(ctx context.Context, edges []EdgeSpec) error {
	request := &pb.UpdateAllowedEdgesRequest{}
	for _, edge := range edges {
		converted, err := edge.Proto()
		if err != nil {
			return err
		}
		request.Edges = append(request.Edges, converted)
	}
	_, err := c.admin.UpdateAllowedEdges(ctx, request)
	return wrap(err)
}

// UpsertEdge adds the edge or replaces the one with the same id.
func (c *Client) UpsertEdge(ctx context.Context, edge EdgeSpec) error {
	converted, err := edge.Proto()
	if err != nil {
		return err
	}
	_, err = c.admin.UpsertEdge(ctx, &pb.UpsertEdgeRequest{Edge: converted})
	return wrap(err)
}

// DeleteEdge removes an edge and disconnects it; false if no such edge was configured.
func (c *Client) DeleteEdge(ctx context.Context, id string) (bool, error) {
	response, err := c.admin.DeleteEdge(ctx, &pb.DeleteEdgeRequest{Id: id})
	if err != nil {
		return false, wrap(err)
	}
	return response.GetDeleted(), nil
}

// ListEdges returns the configured edges with their connection and config state.
func (c *Client) ListEdges(ctx context.Context) ([]EdgeState, error) {
	response, err := c.admin.ListEdges(ctx, &pb.ListEdgesRequest{})
	if err != nil {
		return nil, wrap(err)
	}
	edges := make([]EdgeState, 0, len(response.GetEdges()))
	for _, info := range response.GetEdges() {
		edges = append(edges, edgeStateFromProto(info))
	}
	return edges, nil
}

// GetStatus returns the hub's running state and its connected edges.
func (c *Client) GetStatus(ctx context.Context) (Status, error) {
	response, err := c.admin.GetStatus(ctx, &pb.GetStatusRequest{})
	if err != nil {
		return Status{}, wrap(err)
	}
	return statusFromProto(response), nil
}

// CreateConnectionToken returns the token an edge starts with. The secret is needed when the
// hub no longer knows it in clear (after a restart it keeps only its hash); pass "" otherwise.
func (c *Client) CreateConnectionToken(ctx context.Context, edgeID, secret string) (CreatedToken, error) {
	response, err := c.admin.CreateConnectionToken(ctx, &pb.CreateConnectionTokenRequest{EdgeId: edgeID, Secret: secret})
	if err != nil {
		return CreatedToken{}, wrap(err)
	}
	return CreatedToken{
		Token:   response.GetToken(),
		HubHost: response.GetHubHost(),
		HubPort: int(response.GetHubPort()),
		Pin:     response.GetPin(),
	}, nil
}

// DisconnectEdge drops an edge's tunnel (it reconnects by itself); false if it was not connected.
func (c *Client) DisconnectEdge(ctx context.Context, id string) (bool, error) {
	response, err := c.admin.DisconnectEdge(ctx, &pb.DisconnectEdgeRequest{Id: id})
	if err != nil {
		return false, wrap(err)
	}
	return response.GetDisconnected(), nil
}

// Drain begins draining the hub, as SIGTERM does: no new tunnels, and every edge moves its new
// streams to its other tunnels. It returns how many tunnels were asked.
func (c *Client) Drain(ctx context.Context) (uint32, error) {
	response, err := c.admin.Drain(ctx, &pb.DrainRequest{})
	if err != nil {
		return 0, wrap(err)
	}
	return response.GetTunnels(), nil
}

// DrainEdge asks one edge to move its new streams to its other tunnels; false if it cannot.
func (c *Client) DrainEdge(ctx context.Context, id string) (bool, error) {
	response, err := c.admin.DrainEdge(ctx, &pb.DrainEdgeRequest{Id: id})
	if err != nil {
		return false, wrap(err)
	}
	return response.GetDrained(), nil
}

// bearer attaches the admin token to every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false only for plaintext connections, which the hub allows on
// loopback; with WithTLS the token never travels unencrypted.
func (b bearer) RequireTransportSecurity() bool {
	return b.secure
}
