package hubclient_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// edgeIP keeps edge listeners apart from everything on 127.0.0.1.
const edgeIP = "127.0.0.2"

const adminToken = "test-admin-token"

// binary is $REMOTEINGRESS_BIN or the workspace's debug build.
func binary(t *testing.T) string {
	t.Helper()
	if path := os.Getenv("REMOTEINGRESS_BIN"); path != "" {
		return path
	}
	path := filepath.Join(repoRoot(t), "target", "debug", "remoteingress")
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no remoteingress binary at %s: run `cargo build` or set REMOTEINGRESS_BIN", path)
	}
	return path
}

// freePort is a TCP port free on host right now.
func freePort(t *testing.T, host string) int {
	t.Helper()
	listener, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	return listener.Addr().(*net.TCPAddr).Port
}

// eventually polls check until it is true; fails the test after 20 s saying what it waited for.
func eventually(t *testing.T, what func() string, check func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !check() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func says(text string) func() string { return func() string { return text } }

func accepts(address string) bool {
	conn, err := net.DialTimeout("tcp", address, time.Second)
	if err == nil {
		conn.Close()
	}
	return err == nil
}

// process is a running binary whose output is kept for failure messages.
type process struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	output bytes.Buffer
}

func (p *process) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.output.Write(b)
}

func (p *process) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.output.String()
}

func spawn(t *testing.T, env []string, args ...string) *process {
	t.Helper()
	p := &process{cmd: exec.Command(binary(t), args...)}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return p
}

func (p *process) stop() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
}

// hub is a hub process with fixed ports and state directory, so it can be restarted in place.
type hub struct {
	t                                  *testing.T
	stateDir                           string
	tunnelPort, adminPort, metricsPort int
	process                            *process
}

func startHub(t *testing.T) *hub {
	h := &hub{
		t:           t,
		stateDir:    t.TempDir(),
		tunnelPort:  freePort(t, "127.0.0.1"),
		adminPort:   freePort(t, "127.0.0.1"),
		metricsPort: freePort(t, "127.0.0.1"),
	}
	h.restart()
	return h
}

func (h *hub) address() string { return "127.0.0.1:" + strconv.Itoa(h.adminPort) }

func (h *hub) restart() {
	h.t.Helper()
	if h.process != nil {
		h.process.stop()
	}
	h.process = spawn(h.t, []string{"REMOTEINGRESS_ADMIN_TOKEN=" + adminToken},
		"hub",
		"--listen-address=127.0.0.1",
		"--tunnel-port="+strconv.Itoa(h.tunnelPort),
		"--admin-addr="+h.address(),
		"--metrics-addr=127.0.0.1:"+strconv.Itoa(h.metricsPort),
		"--state-dir="+h.stateDir,
		"--public-host=127.0.0.1",
		// The client never needs QUIC; without it no UDP port has to be free as well.
		"--no-quic",
	)
	eventually(h.t, func() string { return "the hub's admin API\n" + h.process.String() }, func() bool {
		return accepts(h.address())
	})
}

// startEdge runs an edge with a connection token, listening on edgeIP; returns its process.
func startEdge(t *testing.T, token string) *process {
	t.Helper()
	status := "127.0.0.1:" + strconv.Itoa(freePort(t, "127.0.0.1"))
	edge := spawn(t, nil,
		"edge",
		"--token="+token,
		"--bind-address="+edgeIP,
		"--firewall=off",
		"--no-stun",
		"--reconnect-min-ms=50",
		"--reconnect-max-secs=1",
		"--status-addr="+status,
		"--metrics-addr=127.0.0.1:"+strconv.Itoa(freePort(t, "127.0.0.1")),
	)
	eventually(t, says("the edge's status API"), func() bool { return accepts(status) })
	return edge
}

// testContext ends with the test, and after a minute at most.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
