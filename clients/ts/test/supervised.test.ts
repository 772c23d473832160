import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync, rmSync } from "node:fs";
import { createServer, Socket, type Server } from "node:net";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  BinaryNotFoundError,
  findBinary,
  RemoteIngressEdge,
  RemoteIngressHub,
  type CrashRecovered,
  type CrashRecoveryFailed,
} from "../src/index.js";
import { BINARY, EDGE_IP, eventually, freePort } from "./harness.js";

// The README's examples run as written: what differs on a test machine (loopback addresses,
// no nftables, no STUN, quick reconnects) is set through the environment the binaries inherit.
Object.assign(process.env, {
  REMOTEINGRESS_BIN: BINARY,
  REMOTEINGRESS_LISTEN_ADDRESS: "127.0.0.1",
  REMOTEINGRESS_BIND_ADDRESS: EDGE_IP,
  REMOTEINGRESS_FIREWALL: "off",
  REMOTEINGRESS_NO_STUN: "true",
  REMOTEINGRESS_RECONNECT_MIN_MS: "50",
  REMOTEINGRESS_RECONNECT_MAX_SECS: "1",
  REMOTEINGRESS_LOG_LEVEL: "warn",
});

/** A target that answers each connection with the PROXY line it received. */
class Target {
  readonly lines: string[] = [];
  private constructor(
    readonly server: Server,
    readonly port: number,
  ) {}

  static async start(): Promise<Target> {
    const server = createServer();
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    const address = server.address();
    assert.ok(address && typeof address === "object");
    const target = new Target(server, address.port);
    server.on("connection", (socket) => {
      let received = "";
      socket.on("data", (chunk) => {
        received += chunk.toString();
        const end = received.indexOf("\r\n");
        if (end >= 0) {
          target.lines.push(received.slice(0, end));
          socket.end(`${received.slice(0, end)}\n`);
        }
      });
      socket.on("error", () => {});
    });
    return target;
  }
}

/** Sends a request through the edge's public port and returns what the target saw. */
async function roundTrip(port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const socket = new Socket();
    let answer = "";
    const timer = setTimeout(() => socket.destroy(), 2_000);
    socket.on("data", (chunk) => (answer += chunk.toString()));
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(answer.includes("\n") ? answer.trim() : undefined);
    });
    socket.on("error", () => {});
    socket.connect(port, EDGE_IP, () => socket.write("hello\r\n"));
  });
}

/** Whether `pid` runs (a zombie no longer does: nothing may reap orphans in a container). */
function alive(pid: number | undefined): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return pid !== undefined && stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

const SECRET = "supersecrettoken1";
let target: Target;
let hub: RemoteIngressHub;
let edge: RemoteIngressEdge;
let tunnelPort: number;
let publicPort: number;
const events: string[] = [];

before(async () => {
  target = await Target.start();
  tunnelPort = await freePort();
  publicPort = await freePort(EDGE_IP);
});

after(async () => {
  await edge?.stop();
  await hub?.stop();
  target.server.close();
});

test("the original README's hub and edge examples, run as written", async () => {
  hub = new RemoteIngressHub();
  hub.on("edgeConnected", ({ edgeId }) => events.push(`edgeConnected ${edgeId}`));
  hub.on("edgeDisconnected", ({ edgeId }) => events.push(`edgeDisconnected ${edgeId}`));
  hub.on("streamOpened", ({ edgeId }) => events.push(`streamOpened ${edgeId}`));
  hub.on("streamClosed", ({ edgeId }) => events.push(`streamClosed ${edgeId}`));
  await hub.start({ tunnelPort, targetHost: "127.0.0.1" });
  assert.equal(hub.running, true);
  await assert.rejects(hub.start({ tunnelPort }), /already started/);
  await assert.rejects(new RemoteIngressHub().start({ tls: { certPem: "x" } }), /both certPem and keyPem/);
  assert.equal(hub.running, true);
  await hub.updateAllowedEdges([
    { id: "edge-nyc-01", secret: SECRET, listenPorts: [publicPort], targetPorts: { [publicPort]: target.port } },
  ]);

  // Started as in the original README, without publicHost: the caller names the host.
  const { token } = await hub.createConnectionToken("edge-nyc-01", { hubHost: "127.0.0.1" });
  edge = new RemoteIngressEdge();
  edge.on("tunnelConnected", () => events.push("tunnelConnected"));
  edge.on("portsAssigned", ({ listenPorts }) => events.push(`portsAssigned ${listenPorts}`));
  await edge.start({ token });
  assert.equal(edge.running, true);

  const seen = await eventually("a round trip through the tunnel", () => roundTrip(publicPort));
  assert.match(seen, new RegExp(`^PROXY TCP4 127\\.0\\.0\\.1 ${EDGE_IP.replace(/\./g, "\\.")} \\d+ ${publicPort}$`));
  await eventually(
    () => `the events, seen: ${events.join(", ")}`,
    () =>
      ["edgeConnected edge-nyc-01", "streamOpened edge-nyc-01", "streamClosed edge-nyc-01", `portsAssigned ${publicPort}`].every(
        (event) => events.includes(event),
      ) || undefined,
  );

  const hubStatus = await hub.getStatus();
  const edgeStatus = await edge.getStatus();
  // Plain data: JSON as it is, and back to the same values.
  const hubJson = JSON.parse(JSON.stringify(hubStatus));
  assert.equal(hubJson.running, true);
  assert.equal(hubJson.tunnelPort, tunnelPort);
  assert.deepEqual(
    hubJson.connectedEdges.map((e: { edgeId: string; transport: string }) => [e.edgeId, e.transport]),
    [["edge-nyc-01", "tcpTls"]],
  );
  assert.equal(typeof hubStatus.connectedEdges[0]?.bytesIn, "number");
  assert.ok(hubStatus.connectedEdges[0]?.connectedSince instanceof Date);
  const edgeJson = JSON.parse(JSON.stringify(edgeStatus));
  assert.deepEqual(
    { running: edgeJson.running, connected: edgeJson.connected, publicIp: edgeJson.publicIp, listenPorts: edgeJson.listenPorts },
    { running: true, connected: true, publicIp: null, listenPorts: [publicPort] },
  );
  assert.equal(typeof edgeJson.activeStreams, "number");
  assert.equal(JSON.stringify(edgeStatus).includes("$typeName"), false);
  assert.equal(JSON.stringify(hubStatus).includes("$typeName"), false);
});

test("kill -9 of the hub: it comes back with its edges, and traffic flows again", async () => {
  const crashed = hub.pid;
  const stateDir = readFileSync(`/proc/${crashed}/cmdline`, "utf8")
    .split("\0")
    .find((arg) => arg.startsWith("--state-dir="))
    ?.slice("--state-dir=".length);
  assert.ok(stateDir);
  const recovered = once(hub, "crashRecovered") as Promise<[CrashRecovered]>;
  process.kill(crashed ?? 0, "SIGKILL");
  // The edges the hub kept on disk are lost with it: only re-applying them brings them back.
  await eventually("the hub to be gone", () => (alive(crashed) ? undefined : true));
  rmSync(join(stateDir, "edges.json"), { force: true });
  const [payload] = await recovered;
  assert.equal(payload.signal, "SIGKILL");
  assert.ok(payload.attempts >= 1);
  assert.notEqual(hub.pid, crashed);
  const [edgeState] = await hub.client.listEdges();
  assert.equal(edgeState?.id, "edge-nyc-01", "the allowed edges were re-applied");
  await eventually("traffic through the restarted hub", () => roundTrip(publicPort));
  const status = await hub.getStatus();
  assert.equal(status.running, true);
});

test("kill -9 of the edge: it comes back, and traffic flows again", async () => {
  const crashed = edge.pid;
  const recovered = once(edge, "crashRecovered") as Promise<[CrashRecovered]>;
  process.kill(crashed ?? 0, "SIGKILL");
  const [payload] = await recovered;
  assert.equal(payload.signal, "SIGKILL");
  assert.equal(edge.running, true);
  await eventually("traffic through the restarted edge", () => roundTrip(publicPort));
});

test("stop() ends both binaries, and a second stop() is harmless", async () => {
  const pids = [hub.pid, edge.pid];
  await edge.stop();
  await hub.stop();
  await edge.stop();
  await hub.stop();
  assert.equal(hub.running, false);
  assert.equal(edge.running, false);
  assert.deepEqual(
    pids.map((pid) => alive(pid)),
    [false, false],
  );
  assert.deepEqual(await hub.getStatus(), { running: false, tunnelPort, connectedEdges: [], hubId: "", draining: false, pin: "" });
  assert.equal((await edge.getStatus()).running, false);
});

test("a hub that keeps crashing ends in crashRecoveryFailed with the reason", async () => {
  const port = await freePort();
  const flaky = new RemoteIngressHub({ maxRestartAttempts: 2, restartDelayMs: 500 });
  await flaky.start({ tunnelPort: port });
  const failed = once(flaky, "crashRecoveryFailed") as Promise<[CrashRecoveryFailed]>;
  const crashed = flaky.pid;
  process.kill(crashed ?? 0, "SIGKILL");
  // Someone else takes the tunnel port before the restart: every restart fails to bind it.
  const squatter = createServer();
  await eventually("the tunnel port to be free after the kill", async () => {
    try {
      squatter.listen(port, "127.0.0.1");
      await once(squatter, "listening");
      return true;
    } catch {
      return undefined;
    }
  });
  try {
    const [payload] = await failed;
    assert.equal(payload.attempts, 2);
    assert.match(payload.reason, /in use/i);
    assert.equal(flaky.running, false);
  } finally {
    squatter.close();
    await flaky.stop();
  }
});

test("a binary ends with the process that started it, even when that process is killed", async () => {
  const index = new URL("../src/index.js", import.meta.url).href;
  const script = `
    import { RemoteIngressHub } from ${JSON.stringify(index)};
    const hub = new RemoteIngressHub();
    await hub.start({ tunnelPort: ${await freePort()} });
    console.log(hub.pid);
    setInterval(() => {}, 1000);
  `;
  const parent = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  let printed = "";
  parent.stdout?.on("data", (chunk) => (printed += chunk.toString()));
  const pid = await eventually("the parent to start its hub", () => (printed.includes("\n") ? Number(printed.trim()) : undefined));
  assert.equal(alive(pid), true);
  parent.kill("SIGKILL");
  await eventually("the hub to exit after its parent was killed", () => (alive(pid) ? undefined : true));
});

test("a missing binary is a clear error naming where it was looked for", async () => {
  const hub = new RemoteIngressHub({ binaryPath: "/nonexistent/remoteingress" });
  await assert.rejects(hub.start(), (error: Error) => error instanceof BinaryNotFoundError && /binaryPath/.test(error.message));
  await hub.stop();
  assert.throws(
    () => findBinary(undefined, { PATH: "/nonexistent" }),
    (error: Error) => /binaryPath/.test(error.message) && /REMOTEINGRESS_BIN/.test(error.message) && /PATH/.test(error.message),
  );
  const edge = new RemoteIngressEdge({ binaryPath: "/nonexistent/remoteingress" });
  await assert.rejects(edge.start({ token: "x" }), BinaryNotFoundError);
  await edge.stop();
  await edge.stop();
});
