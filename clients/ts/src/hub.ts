import { timestampDate } from "@bufbuild/protobuf/wkt";
import { createClient, type Client } from "@connectrpc/connect";

import { HubAdmin, type WatchEventsResponse } from "./gen/remoteingress/v1/hub_pb.js";
import { edgeFromProto, edgeToProto, type EdgeDefinition, type EdgeState } from "./edges.js";
import { call } from "./errors.js";
import { StreamingClient, type WatchEvents } from "./client.js";
import { hubStatusFromProto, transportName, type HubStatus, type TransportName } from "./status.js";
import type { ConnectionOptions } from "./transport.js";

/** Fields every hub event carries. */
export interface HubEventBase {
  /** When the hub saw it. */
  time?: Date;
  /** The edge concerned (empty for auth failures). */
  edgeId: string;
}

/** The events of {@link RemoteIngressHubClient}, each with its listener's arguments. */
export interface HubEvents extends WatchEvents {
  /** An edge authenticated and its tunnel is up. */
  edgeConnected: [HubEventBase & { remoteAddr: string; transport: TransportName }];
  /** An edge's tunnel ended. */
  edgeDisconnected: [HubEventBase & { reason: string }];
  /** A tunnelled TCP connection started: its client, the edge port it reached, its target. */
  streamOpened: [HubEventBase & { streamId: number; clientAddr: string; edgePort: number; target: string }];
  /** A tunnelled TCP connection ended. */
  streamClosed: [HubEventBase & { streamId: number }];
  /** A UDP session started: its client, the edge port it wrote to, its target. */
  udpSessionOpened: [HubEventBase & { sessionId: number; clientAddr: string; edgePort: number; target: string }];
  /** A UDP session ended. */
  udpSessionClosed: [HubEventBase & { sessionId: number }];
  /** A configuration was sent to an edge. */
  configPushed: [HubEventBase & { version: number }];
  /** An edge acknowledged a configuration (`error` set if it kept its previous one). */
  configApplied: [HubEventBase & { version: number; error?: string }];
  /** A tunnel connection failed to authenticate. */
  authFailed: [HubEventBase & { remoteAddr: string; reason: string; kind: string }];
  /** An edge asked for a port it is not assigned; nothing was connected. */
  openRefused: [HubEventBase & { protocol: string; port: number; reason: string }];
  /** The hub's edges file changed: applied, or rejected with `error` (the hub keeps its edges). */
  configReloaded: [HubEventBase & { path: string; digest: string; generation?: number; edges: number; error?: string }];
  /** This watcher was too slow and missed `count` events. */
  eventsMissed: [HubEventBase & { count: number }];
}

/** Options of {@link RemoteIngressHubClient}. */
export interface RemoteIngressHubClientOptions extends ConnectionOptions {
  /** Only watch this edge's events. */
  watchEdgeId?: string;
}

/** What {@link RemoteIngressHubClient.createConnectionToken} may be told besides the edge id. */
export interface TokenOptions {
  /** The edge's secret: needed after a hub restart, since the hub keeps only its hash. */
  secret?: string;
  /** The host edges reach the hub by; default the hub's `--public-host` (required without one). */
  hubHost?: string;
  /** The port edges reach the hub by; default the hub's public port (its tunnel port). */
  hubPort?: number;
}

/** A connection token and what it carries, from {@link RemoteIngressHubClient.createConnectionToken}. */
export interface CreatedToken {
  /** The token for `remoteingress edge --token`. */
  token: string;
  /** Hub host in the token. */
  hubHost: string;
  /** Hub port in the token. */
  hubPort: number;
  /** Certificate pin in the token. */
  pin: string;
}

/**
 * Client of a running hub's admin API (`remoteingress.v1.HubAdmin`), for a hub run by systemd,
 * Kubernetes or {@link RemoteIngressHub}; shaped like the original
 * TypeScript API: edges in their camelCase shape, and events through `on(...)`. The event
 * stream starts with the first listener of a hub event and survives hub restarts.
 */
export class RemoteIngressHubClient extends StreamingClient<HubEvents, WatchEventsResponse> {
  /** The generated client, for anything the methods here do not cover. */
  readonly raw: Client<typeof HubAdmin>;
  private readonly watchEdgeId: string;

  constructor(options: RemoteIngressHubClientOptions) {
    super(options);
    this.raw = createClient(HubAdmin, this.connection.transport);
    this.watchEdgeId = options.watchEdgeId ?? "";
  }

  /** Replaces the whole allowed-edge set; one invalid edge rejects the call and nothing changes. */
  async updateAllowedEdges(edges: EdgeDefinition[]): Promise<void> {
    const request = { edges: edges.map(edgeToProto) };
    await call(() => this.raw.updateAllowedEdges(request));
  }

  /** Adds an edge or replaces the one with the same id. */
  async upsertEdge(edge: EdgeDefinition): Promise<void> {
    const request = { edge: edgeToProto(edge) };
    await call(() => this.raw.upsertEdge(request));
  }

  /** Removes an edge and disconnects it; false if no such edge was configured. */
  async deleteEdge(id: string): Promise<boolean> {
    return (await call(() => this.raw.deleteEdge({ id }))).deleted;
  }

  /** The configured edges with their connection and config state. */
  async listEdges(): Promise<EdgeState[]> {
    return (await call(() => this.raw.listEdges({}))).edges.map(edgeFromProto);
  }

  /** Running state and connected edges, as plain data. */
  async getStatus(): Promise<HubStatus> {
    return hubStatusFromProto(await call(() => this.raw.getStatus({})));
  }

  /**
   * The token an edge starts with, carrying the hub's certificate pin. `options` is the edge's
   * secret, or {@link TokenOptions}: the secret (needed when the hub no longer knows it in clear:
   * after a restart it keeps only its hash) and the host and port edges reach the hub by.
   */
  async createConnectionToken(edgeId: string, options: string | TokenOptions = {}): Promise<CreatedToken> {
    const { secret = "", hubHost = "", hubPort = 0 } = typeof options === "string" ? { secret: options } : options;
    const created = await call(() => this.raw.createConnectionToken({ edgeId, secret, hubHost, hubPort }));
    return { token: created.token, hubHost: created.hubHost, hubPort: created.hubPort, pin: created.pin };
  }

  /** Drops an edge's tunnel (it reconnects by itself); false if it was not connected. */
  async disconnectEdge(id: string): Promise<boolean> {
    return (await call(() => this.raw.disconnectEdge({ id }))).disconnected;
  }

  /**
   * Begins draining the hub, as SIGTERM does: no new tunnels, and every edge moves its new
   * streams to its other tunnels. Returns how many tunnels were asked.
   */
  async drain(): Promise<number> {
    return (await call(() => this.raw.drain({}))).tunnels;
  }

  /** Asks one edge to move its new streams to its other tunnels; false if it cannot. */
  async drainEdge(id: string): Promise<boolean> {
    return (await call(() => this.raw.drainEdge({ id }))).drained;
  }

  protected override subscribe(signal: AbortSignal, onHeader: (headers: Headers) => void) {
    return this.raw.watchEvents({ edgeId: this.watchEdgeId }, { signal, onHeader, timeoutMs: 0 });
  }

  protected override dispatch(message: WatchEventsResponse): void {
    const base: HubEventBase = {
      edgeId: message.edgeId,
      time: message.time && timestampDate(message.time),
    };
    const event = message.event;
    switch (event.case) {
      case "edgeConnected":
        this.emit(event.case, { ...base, remoteAddr: event.value.remoteAddr, transport: transportName(event.value.transport) });
        break;
      case "edgeDisconnected":
        this.emit(event.case, { ...base, reason: event.value.reason });
        break;
      case "streamOpened": {
        const { streamId, clientAddr, edgePort, target } = event.value;
        this.emit(event.case, { ...base, streamId, clientAddr, edgePort, target });
        break;
      }
      case "streamClosed":
        this.emit(event.case, { ...base, streamId: event.value.streamId });
        break;
      case "udpSessionOpened": {
        const { sessionId, clientAddr, edgePort, target } = event.value;
        this.emit(event.case, { ...base, sessionId, clientAddr, edgePort, target });
        break;
      }
      case "udpSessionClosed":
        this.emit(event.case, { ...base, sessionId: event.value.sessionId });
        break;
      case "configPushed":
        this.emit(event.case, { ...base, version: Number(event.value.version) });
        break;
      case "configApplied":
        this.emit(event.case, { ...base, version: Number(event.value.version), error: event.value.error || undefined });
        break;
      case "authFailed":
        this.emit(event.case, { ...base, remoteAddr: event.value.remoteAddr, reason: event.value.reason, kind: event.value.kind });
        break;
      case "openRefused":
        this.emit(event.case, { ...base, protocol: event.value.protocol, port: event.value.port, reason: event.value.reason });
        break;
      case "configReloaded": {
        const { path, digest, generation, edges, error } = event.value;
        this.emit(event.case, {
          ...base,
          path,
          digest,
          generation: generation === undefined ? undefined : Number(generation),
          edges,
          error: error || undefined,
        });
        break;
      }
      case "eventsMissed":
        this.emit(event.case, { ...base, count: Number(event.value.count) });
        break;
      case undefined:
        break;
    }
  }
}
