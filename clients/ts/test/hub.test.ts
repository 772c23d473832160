import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  Code,
  decodeConnectionToken,
  RemoteIngressEdgeClient,
  RemoteIngressError,
  RemoteIngressHubClient,
  type EdgeDefinition,
  type HubEvents,
} from "../src/index.js";
import { accepts, ADMIN_TOKEN, Edge, EDGE_IP, eventually, freePort, Hub, VECTORS } from "./harness.js";

const SECRET = "s3cr3t";
let hub: Hub;
let client: RemoteIngressHubClient;
let edge: Edge | undefined;

/** Every event the client emitted, in order, for assertions with eventually(). */
const seen: { name: keyof HubEvents; args: unknown[] }[] = [];
const WATCHED: (keyof HubEvents)[] = ["edgeConnected", "edgeDisconnected", "configPushed", "configApplied", "watchReconnected"];

function eventAfter(index: number, name: keyof HubEvents, edgeId?: string) {
  return () =>
    seen
      .slice(index)
      .find((event) => event.name === name && (edgeId === undefined || (event.args[0] as { edgeId: string }).edgeId === edgeId));
}

before(async () => {
  hub = await Hub.start();
  client = new RemoteIngressHubClient({ address: hub.address, token: ADMIN_TOKEN });
  for (const name of WATCHED) {
    client.on(name, (...args: unknown[]) => seen.push({ name, args }));
  }
  await client.watching();
});

after(async () => {
  await client.close();
  await edge?.process.stop();
  await hub.stop();
});

test("a full updateAllowedEdges makes the edge connect and open its port", async () => {
  const port = await freePort(EDGE_IP);
  const mark = seen.length;
  await client.updateAllowedEdges([{ id: "e1", secret: SECRET, listenPorts: [port] }]);

  const created = await client.createConnectionToken("e1");
  const token = decodeConnectionToken(created.token);
  assert.equal(token.edgeId, "e1");
  assert.equal(token.secret, SECRET);
  assert.equal(token.hubPort, hub.tunnelPort);
  assert.equal(token.pin, created.pin);
  edge = await Edge.start(created.token);

  const connected = await eventually("an edgeConnected event", eventAfter(mark, "edgeConnected", "e1"));
  const [payload] = connected.args as HubEvents["edgeConnected"];
  assert.equal(payload.transport, "tcpTls");
  assert.ok(payload.time instanceof Date);
  await eventually("the edge to listen on its port", async () => ((await accepts(EDGE_IP, port)) ? true : undefined));

  const status = await client.getStatus();
  assert.equal(status.running, true);
  assert.equal(status.tunnelPort, hub.tunnelPort);
  assert.deepEqual(
    status.connectedEdges.map((e) => e.edgeId),
    ["e1"],
  );
  const [listed] = await client.listEdges();
  assert.equal(listed?.id, "e1");
  assert.deepEqual(listed?.listenPorts, [port]);
  assert.equal(listed?.connected, true);
  assert.equal("secret" in (listed ?? {}), false);
  await eventually("the edge to acknowledge its config", async () => {
    const [state] = await client.listEdges();
    return state && state.appliedConfigVersion === state.desiredConfigVersion ? true : undefined;
  });
});

test("the edge status API reports the tunnel and live port changes", async () => {
  assert.ok(edge, "the first test started the edge");
  const status = new RemoteIngressEdgeClient({ address: edge.address });
  try {
    const changes: { listenPorts: number[]; update: boolean }[] = [];
    status.on("portsChanged", (change) => changes.push(change));
    await status.watching();
    const now = await status.getStatus();
    assert.equal(now.connected, true);
    assert.equal(now.transport, "tcpTls");
    const added = await freePort(EDGE_IP);
    await client.upsertEdge({ id: "e1", secret: SECRET, listenPorts: [...now.listenPorts, added] });
    await eventually("the port change to reach the edge", () =>
      changes.find((change) => change.update && change.listenPorts.includes(added)),
    );
    assert.ok((await status.getStatus()).listenPorts.includes(added));
  } finally {
    await status.close();
  }
});

test("every invalid shared vector is a typed InvalidArgument naming the field; nothing changes", async () => {
  const before = await client.listEdges();
  const vectors = VECTORS.edges as { name: string; edge: EdgeDefinition; valid: boolean; field?: string }[];
  for (const [i, vector] of vectors.entries()) {
    // Own ids, so that the vectors never replace the connected edge e1.
    const edge = { ...vector.edge, id: `vector-${i}` };
    if (vector.valid) {
      await client.upsertEdge(edge);
      const stored = (await client.listEdges()).find((e) => e.id === edge.id);
      assert.deepEqual(stored?.listenPorts, edge.listenPorts, vector.name);
      assert.deepEqual(stored?.targetHosts ?? {}, edge.targetHosts ?? {}, vector.name);
      // The firewall comes back in the shape it went in.
      const rules = (stored?.firewallConfig?.rules ?? []).map(({ id, direction, action, sourceIP, destPort, protocol }) =>
        JSON.stringify({ id, direction, action, sourceIP, destPort, protocol }),
      );
      const sent = (edge.firewallConfig?.rules ?? []).map(({ id, direction, action, sourceIP, destPort, protocol }) =>
        JSON.stringify({ id, direction, action, sourceIP, destPort, protocol }),
      );
      assert.deepEqual(rules, sent, vector.name);
      assert.deepEqual(
        stored?.firewallConfig?.rateLimits?.map((l) => [l.id, l.port, l.protocol, l.rate, l.burst]),
        edge.firewallConfig?.rateLimits?.map((l) => [l.id, l.port, l.protocol, l.rate, l.burst]),
        vector.name,
      );
      assert.equal(await client.deleteEdge(edge.id), true, vector.name);
      continue;
    }
    await assert.rejects(
      // A full replacement that would drop e1: rejected as a whole, so e1 stays.
      client.updateAllowedEdges([edge]),
      (error) => {
        assert.ok(error instanceof RemoteIngressError, vector.name);
        assert.equal(error.code, Code.InvalidArgument, vector.name);
        assert.equal(error.edgeId, edge.id, vector.name);
        assert.equal(error.field, vector.field, `${vector.name}: ${error.message}`);
        return true;
      },
    );
  }
  assert.deepEqual(await client.listEdges(), before);
  assert.equal(await client.deleteEdge("no-such-edge"), false);
});

test("a wrong admin token is Unauthenticated", async () => {
  const intruder = new RemoteIngressHubClient({ address: hub.address, token: "wrong" });
  try {
    await assert.rejects(intruder.getStatus(), (error) => error instanceof RemoteIngressError && error.code === Code.Unauthenticated);
    const refused = new Promise<Error>((resolve) => intruder.once("watchError", resolve));
    let reconnected = false;
    intruder.on("watchReconnected", () => (reconnected = true));
    const error = RemoteIngressError.from(await refused);
    assert.equal(error.code, Code.Unauthenticated);
    assert.equal(reconnected, false, "a refused watch is not a subscription");
  } finally {
    await intruder.close();
  }
});

test("disconnectEdge drops the tunnel and the edge comes back", async () => {
  const mark = seen.length;
  assert.equal(await client.disconnectEdge("e1"), true);
  await eventually("edgeDisconnected", eventAfter(mark, "edgeDisconnected", "e1"));
  await eventually("edgeConnected again", eventAfter(mark, "edgeConnected", "e1"));
});

test("the event stream survives a hub restart", async () => {
  const mark = seen.length;
  await hub.restart();
  await eventually("watchReconnected", eventAfter(mark, "watchReconnected"));
  // The hub kept e1 in its state directory and the edge reconnects by itself, perhaps before the
  // watch resubscribed (events in that gap are missed: watchReconnected says so). Events that
  // happen after the resubscription arrive on the same listeners:
  await eventually(
    () => `e1 back after the restart\n--- hub:\n${hub.process?.output}\n--- edge:\n${edge?.process.output}`,
    async () => ((await client.getStatus()).connectedEdges.some((e) => e.edgeId === "e1") ? true : undefined),
  );
  const resubscribed = seen.length;
  assert.equal(await client.disconnectEdge("e1"), true);
  await eventually("edgeDisconnected after the restart", eventAfter(resubscribed, "edgeDisconnected", "e1"));
  await eventually("edgeConnected after the restart", eventAfter(resubscribed, "edgeConnected", "e1"));
});

test("drainEdge moves the edge to a new tunnel and drain stops the hub taking tunnels", async () => {
  const mark = seen.length;
  assert.equal(await client.drainEdge("e1"), true);
  await eventually("the drained tunnel to close", eventAfter(mark, "edgeDisconnected", "e1"));
  await eventually("a replacement tunnel", eventAfter(mark, "edgeConnected", "e1"));
  assert.equal(typeof (await client.drain()), "number");
  const status = await client.getStatus();
  assert.equal(status.draining, true);
  assert.match(status.hubId, /.+/);
});
