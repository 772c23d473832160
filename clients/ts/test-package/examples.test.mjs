// The package as a user meets it: run by clients/ts/test-package/run in a new directory where
// only the two packed tarballs are installed (no repository, no REMOTEINGRESS_BIN, nothing on
// PATH), inside a network namespace of its own, so the original README's ports (8443, 80, 443)
// and the edge's firewall are used as written. The original examples are kept as they are,
// except for the import line and loopback settings (the hub host `localhost`, the edges' public
// ports on 127.0.0.2 so that the targets can use 127.0.0.1).

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readFileSync, realpathSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";

import {
  RemoteIngressEdge,
  RemoteIngressHub,
  decodeConnectionToken,
  encodeConnectionToken,
  findBinary,
} from "@remoteingress/client";

const started = [];
after(async () => {
  await Promise.all(started.map((running) => running.stop()));
});

/** Polls `check` until it returns something truthy; fails after `ms`. */
async function until(what, check, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A target on 127.0.0.1:`port` that answers with the PROXY line it was sent. */
async function proxyLineTarget(port) {
  const server = createServer((socket) => {
    let seen = "";
    socket.on("data", (chunk) => {
      seen += chunk.toString("latin1");
      const end = seen.indexOf("\r\n");
      if (end >= 0) {
        socket.end(seen.slice(0, end));
      }
    });
  });
  server.listen(port, "127.0.0.1");
  await once(server, "listening");
  return server;
}

/** Connects from 127.0.0.3 to `host`:`port` and returns what comes back. */
async function request(host, port) {
  const socket = createConnection({ host, port, localAddress: "127.0.0.3" });
  socket.write("GET / HTTP/1.0\r\n\r\n");
  let reply = "";
  for await (const chunk of socket) {
    reply += chunk.toString("latin1");
  }
  return reply;
}

/** A CA and a certificate it signed for `localhost`, made with openssl. */
function testCa() {
  const dir = mkdtempSync(join(tmpdir(), "ca-"));
  const file = (name) => join(dir, name);
  const openssl = (...args) => execFileSync("openssl", args, { stdio: "pipe" });
  const key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  openssl("req", "-x509", ...key, "-keyout", file("ca.key"), "-out", file("ca.crt"), "-subj", "/CN=test-ca",
    "-days", "1", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign");
  openssl("req", ...key, "-keyout", file("hub.key"), "-out", file("hub.csr"), "-subj", "/CN=localhost");
  execFileSync("sh", ["-c", `printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ${file("ext")}`]);
  openssl("x509", "-req", "-in", file("hub.csr"), "-CA", file("ca.crt"), "-CAkey", file("ca.key"),
    "-CAcreateserial", "-out", file("hub.crt"), "-days", "1", "-extfile", file("ext"));
  return {
    caFile: file("ca.crt"),
    certPem: readFileSync(file("hub.crt"), "utf8"),
    keyPem: readFileSync(file("hub.key"), "utf8"),
  };
}

test("the binary comes from the platform package", () => {
  const binary = realpathSync(findBinary());
  assert.match(binary, /node_modules\/@remoteingress\/linux-x64-gnu\/bin\/remoteingress$/);
  assert.equal(process.env.REMOTEINGRESS_BIN, undefined);
});

test("the original README's hub and edge examples, with the hub's pin added to the token", async () => {
  const hub = new RemoteIngressHub();
  started.push(hub);
  const connected = [];
  const logs = [];
  // Listen for events
  hub.on("edgeConnected", ({ edgeId }) => connected.push(edgeId));
  hub.on("edgeDisconnected", ({ edgeId }) => console.log(`Edge ${edgeId} disconnected`));
  hub.on("log", (record) => logs.push(record));

  // Start the hub — listens for edge connections on both TCP and QUIC (same port)
  await hub.start({
    tunnelPort: 8443, // port edges connect to (default: 8443)
    targetHost: "127.0.0.1", // SmartProxy host to forward traffic to
  });

  // Register allowed edges with TCP and UDP listen ports + firewall config
  await hub.updateAllowedEdges([
    {
      id: "edge-nyc-01",
      secret: "supersecrettoken1",
      listenPorts: [80, 443], // TCP ports the edge should listen on
      listenPortsUdp: [53, 51820], // UDP ports (e.g., DNS, WireGuard)
      stunIntervalSecs: 300,
      firewallConfig: {
        blockedIps: ["192.168.1.100", "10.0.0.0/8"],
        rateLimits: [{ id: "http-rate", port: 80, protocol: "tcp", rate: "100/second", perSourceIP: true }],
        rules: [
          { id: "office-https", direction: "input", action: "accept", sourceIP: "10.0.0.0/24", destPort: 443, protocol: "tcp" },
        ],
      },
    },
    {
      id: "edge-fra-02",
      secret: "supersecrettoken2",
      listenPorts: [443, 8080],
    },
  ]);

  // Hub operator generates a token — the original's fields, and the one the hub's pin needs
  const token = encodeConnectionToken({
    hubHost: "localhost",
    hubPort: 8443,
    edgeId: "edge-nyc-01",
    secret: "supersecrettoken1",
    pin: hub.pin,
  });
  assert.equal(decodeConnectionToken(token).pin, hub.pin);

  const edge = new RemoteIngressEdge();
  started.push(edge);
  const assigned = [];
  edge.on("tunnelConnected", () => console.log("Tunnel established"));
  edge.on("portsAssigned", ({ listenPorts }) => assigned.push(...listenPorts));
  await edge.start({ token, bindAddress: "127.0.0.2" });

  await until("the edge's ports", () => assigned.includes(80) && connected.includes("edge-nyc-01"));
  const target = await proxyLineTarget(80);
  try {
    const line = await until("a request through the edge", () => request("127.0.0.2", 80).catch(() => ""));
    assert.match(line, /^PROXY TCP4 127\.0\.0\.3 127\.0\.0\.2 \d+ 80$/);
  } finally {
    target.close();
  }

  // Check status
  const status = await hub.getStatus();
  assert.equal(status.running, true);
  assert.equal(status.tunnelPort, 8443);
  assert.deepEqual(status.connectedEdges.map((e) => e.edgeId), ["edge-nyc-01"]);
  assert.equal(status.pin, hub.pin);

  const listening = logs.find((r) => r.message === "hub listening for edges");
  assert.ok(listening, "the binary's log lines arrive as log events");
  assert.equal(listening.level, "info");
  assert.equal(listening.fields.pin, hub.pin);
  assert.ok(listening.time instanceof Date);

  // A token from the hub itself, started without publicHost: the host is the caller's to give,
  // and by default this machine's name.
  const created = await hub.createConnectionToken("edge-fra-02");
  assert.equal(decodeConnectionToken(created.token).hubHost, hostname());
  assert.equal(created.pin, hub.pin);
  const { token: fraToken } = await hub.createConnectionToken("edge-fra-02", { hubHost: "localhost" });
  const fra = new RemoteIngressEdge();
  started.push(fra);
  await fra.start({ token: fraToken, bindAddress: "127.0.0.4" });
  await until("edge-fra-02 connected", () => connected.includes("edge-fra-02"));

  await Promise.all([edge.stop(), fra.stop()]);
  await hub.stop();
});

test("a pinless token reaches a hub whose certificate a trusted CA signed", async () => {
  const ca = testCa();
  // The conventional variable, as for OpenSSL: the edge binary inherits it.
  process.env.SSL_CERT_FILE = ca.caFile;
  const hub = new RemoteIngressHub();
  started.push(hub);
  const connected = [];
  hub.on("edgeConnected", ({ edgeId }) => connected.push(edgeId));
  await hub.start({ tunnelPort: 9443, targetHost: "127.0.0.1", tls: { certPem: ca.certPem, keyPem: ca.keyPem } });
  await hub.updateAllowedEdges([{ id: "edge-tokyo-01", secret: "generated-secret-abc123", listenPorts: [8081] }]);

  // The original README's token, unchanged
  const token = encodeConnectionToken({
    hubHost: "localhost",
    hubPort: 9443,
    edgeId: "edge-tokyo-01",
    secret: "generated-secret-abc123",
  });
  const edge = new RemoteIngressEdge();
  started.push(edge);
  await edge.start({ token, bindAddress: "127.0.0.2" });
  await until("the pinless edge connected", () => connected.includes("edge-tokyo-01"));
  await edge.stop();
  await hub.stop();
});

test("a pinless token against a self-signed hub is refused, saying what to add", async () => {
  const hub = new RemoteIngressHub();
  started.push(hub);
  await hub.start({ tunnelPort: 10443, targetHost: "127.0.0.1" });
  await hub.updateAllowedEdges([{ id: "edge-1", secret: "s3cret", listenPorts: [8082] }]);
  const token = encodeConnectionToken({ hubHost: "localhost", hubPort: 10443, edgeId: "edge-1", secret: "s3cret" });

  const warnings = [];
  const edge = new RemoteIngressEdge({ logger: { warn: (message, fields) => warnings.push({ message, fields }) } });
  started.push(edge);
  await edge.start({ token, bindAddress: "127.0.0.2" });
  const status = await until("the refusal in the status", async () => {
    const status = await edge.getStatus();
    return status.lastError.includes("not trusted") ? status : undefined;
  });
  for (const hint of ["pin", "--ca-file"]) {
    assert.ok(status.lastError.includes(hint), `the refusal names ${hint}: ${status.lastError}`);
  }
  assert.equal(status.connected, false);
  assert.ok(
    warnings.some(({ fields }) => String(fields.error ?? "").includes("not trusted")),
    "the logger option gets the refusal as a warning",
  );
  assert.deepEqual((await hub.getStatus()).connectedEdges, []);
  await edge.stop();
  await hub.stop();
});
