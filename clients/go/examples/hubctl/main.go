// Command hubctl shows the Go client at work: it admits an edge on a hub, prints the edge's
// connection token, and then prints the hub's events until interrupted.
//
//	go run ./examples/hubctl -addr 127.0.0.1:8444 -token "$ADMIN_TOKEN" -edge edge-1 -secret s3cret -ports 80,443
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"github.com/remoteingress/remoteingress/clients/go/hubclient"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8444", "hub admin API address")
	token := flag.String("token", os.Getenv("REMOTEINGRESS_ADMIN_TOKEN"), "admin token (default $REMOTEINGRESS_ADMIN_TOKEN)")
	edgeID := flag.String("edge", "edge-1", "edge id to admit")
	secret := flag.String("secret", "", "the edge's secret (required)")
	ports := flag.String("ports", "80,443", "comma-separated TCP ports the edge listens on")
	flag.Parse()
	if *secret == "" {
		log.Fatal("-secret is required")
	}
	listenPorts, err := parsePorts(*ports)
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	client, err := hubclient.Dial(ctx, *addr, hubclient.WithToken(*token))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	if err := client.UpsertEdge(ctx, hubclient.EdgeSpec{ID: *edgeID, Secret: *secret, ListenPorts: listenPorts}); err != nil {
		log.Fatal(err)
	}
	created, err := client.CreateConnectionToken(ctx, *edgeID, *secret)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("start the edge with:\n  remoteingress edge --token %s\n\n", created.Token)

	events, err := client.Watch(ctx, hubclient.Filter{EdgeID: *edgeID})
	if err != nil {
		log.Fatal(err)
	}
	for event := range events {
		if event.Kind == hubclient.Reconnected {
			fmt.Println("(event stream resubscribed; events in between were missed)")
			continue
		}
		line, err := json.Marshal(event)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(string(line))
	}
}

func parsePorts(list string) ([]uint32, error) {
	var ports []uint32
	for _, field := range strings.Split(list, ",") {
		port, err := strconv.ParseUint(strings.TrimSpace(field), 10, 16)
		if err != nil {
			return nil, fmt.Errorf("port %q: %w", field, err)
		}
		ports = append(ports, uint32(port))
	}
	return ports, nil
}
