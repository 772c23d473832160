import { EventEmitter } from "node:events";

import { timestampDate } from "@bufbuild/protobuf/wkt";
import { createClient, type Client } from "@connectrpc/connect";

import type { Transport } from "./gen/remoteingress/v1/config_pb.js";
import {
  EdgeStatus,
  type EdgeStatusGetStatusResponse,
  type EdgeStatusWatchEventsResponse,
} from "./gen/remoteingress/v1/edge_pb.js";
import { call } from "./errors.js";
import { connect, type Connection, type ConnectionOptions } from "./transport.js";
import { ResubscribingWatch } from "./watch.js";

/** Fields every edge event carries. */
export interface EdgeEventBase {
  /** When the edge saw it. */
  time?: Date;
}

/** The events of {@link RemoteIngressEdgeStatus}, each with its listener's arguments. */
export interface EdgeEvents {
  /** The tunnel came up. */
  tunnelConnected: [EdgeEventBase & { transport: Transport }];
  /** The tunnel went down; the edge reconnects. */
  tunnelDisconnected: [EdgeEventBase & { reason: string }];
  /** STUN found the edge's public address. */
  publicIpDiscovered: [EdgeEventBase & { ip: string }];
  /** Ports listened on after connecting (`update` false) or after a live change. */
  portsChanged: [EdgeEventBase & { listenPorts: number[]; listenPortsUdp: number[]; update: boolean }];
  /** A configuration could not be applied; the previous one stays. */
  configRejected: [EdgeEventBase & { version: number; error: string }];
  /** A firewall configuration was applied (`error` set if it failed). */
  firewallApplied: [EdgeEventBase & { rules: number; error?: string }];
  /** This watcher was too slow and missed `count` events. */
  eventsMissed: [EdgeEventBase & { count: number }];
  /** The event stream was lost (e.g. edge restart) and is subscribed again. */
  watchReconnected: [];
  /** The event stream failed or broke; it is retried with backoff by itself. */
  watchError: [Error];
}

const STREAM_EVENTS = new Set<string>([
  "tunnelConnected",
  "tunnelDisconnected",
  "publicIpDiscovered",
  "portsChanged",
  "configRejected",
  "firewallApplied",
  "eventsMissed",
  "watchReconnected",
]);

/**
 * Client of an edge's local status API (`remoteingress.v1.EdgeStatus`): its state now, and its
 * events through `on(...)` (the stream starts with the first listener and survives restarts).
 */
export class RemoteIngressEdgeStatus extends EventEmitter<EdgeEvents> {
  /** The generated client, for anything the methods here do not cover. */
  readonly raw: Client<typeof EdgeStatus>;
  private readonly connection: Connection;
  private watch?: ResubscribingWatch<EdgeStatusWatchEventsResponse>;

  constructor(options: ConnectionOptions) {
    super();
    this.connection = connect(options);
    this.raw = createClient(EdgeStatus, this.connection.transport);
    (this as EventEmitter).on("newListener", (event: string | symbol) => {
      if (typeof event === "string" && STREAM_EVENTS.has(event)) {
        this.startWatching();
      }
    });
  }

  /** The edge's state now: tunnel, ports, public IP, firewall. */
  async getStatus(): Promise<EdgeStatusGetStatusResponse> {
    return call(() => this.raw.getStatus({}));
  }

  /**
   * Starts the event stream if no listener did yet, and resolves once it is subscribed: events
   * from then on reach the listeners. Await it before acting on what you want to observe.
   */
  async watching(): Promise<void> {
    await this.startWatching().subscribed;
  }

  /** Stops the event stream and closes the connection. */
  async close(): Promise<void> {
    await this.watch?.stop();
    this.connection.close();
  }

  private startWatching(): ResubscribingWatch<EdgeStatusWatchEventsResponse> {
    if (this.watch) {
      return this.watch;
    }
    this.watch = new ResubscribingWatch<EdgeStatusWatchEventsResponse>({
      subscribe: (signal, onHeader) => this.raw.watchEvents({}, { signal, onHeader, timeoutMs: 0 }),
      onMessage: (message) => this.dispatch(message),
      onReconnected: () => this.emit("watchReconnected"),
      onError: (error) => this.emit("watchError", error instanceof Error ? error : new Error(String(error))),
    });
    return this.watch;
  }

  private dispatch(message: EdgeStatusWatchEventsResponse): void {
    const base: EdgeEventBase = { time: message.time && timestampDate(message.time) };
    const event = message.event;
    switch (event.case) {
      case "tunnelConnected":
        this.emit(event.case, { ...base, transport: event.value.transport });
        break;
      case "tunnelDisconnected":
        this.emit(event.case, { ...base, reason: event.value.reason });
        break;
      case "publicIpDiscovered":
        this.emit(event.case, { ...base, ip: event.value.ip });
        break;
      case "portsChanged":
        this.emit(event.case, {
          ...base,
          listenPorts: event.value.listenPorts,
          listenPortsUdp: event.value.listenPortsUdp,
          update: event.value.update,
        });
        break;
      case "configRejected":
        this.emit(event.case, { ...base, version: Number(event.value.version), error: event.value.error });
        break;
      case "firewallApplied":
        this.emit(event.case, { ...base, rules: event.value.rules, error: event.value.error || undefined });
        break;
      case "eventsMissed":
        this.emit(event.case, { ...base, count: Number(event.value.count) });
        break;
      case undefined:
        break;
    }
  }
}
