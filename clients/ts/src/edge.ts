import { timestampDate } from "@bufbuild/protobuf/wkt";
import { createClient, type Client } from "@connectrpc/connect";

import { EdgeStatus, type EdgeStatusWatchEventsResponse } from "./gen/remoteingress/v1/edge_pb.js";
import { call } from "./errors.js";
import { StreamingClient, type WatchEvents } from "./client.js";
import { edgeStatusFromProto, transportName, type EdgeStatusInfo, type TransportName } from "./status.js";
import type { ConnectionOptions } from "./transport.js";

/** Fields every edge event carries. */
export interface EdgeEventBase {
  /** When the edge saw it. */
  time?: Date;
}

/** The events of {@link RemoteIngressEdgeClient}, each with its listener's arguments. */
export interface EdgeEvents extends WatchEvents {
  /** A tunnel came up (to hub instance `hubId`, empty for an original hub, at `address`). */
  tunnelConnected: [EdgeEventBase & { transport: TransportName; hubId: string; address: string }];
  /** A tunnel went down; the edge reconnects. */
  tunnelDisconnected: [EdgeEventBase & { reason: string; hubId: string; address: string }];
  /** A hub asked the edge to move new streams off its tunnel (it is shutting down). */
  tunnelDraining: [EdgeEventBase & { hubId: string; address: string }];
  /** A client's stream (`tcp`) or UDP session (`udp`) went into the tunnel to `hub`. */
  clientOpened: [EdgeEventBase & { protocol: string; clientAddr: string; edgePort: number; hub: string }];
  /** Hubs offer different configurations under one generation; the running one stays. */
  configDisagreement: [EdgeEventBase & { generation: number; hubs: string[] }];
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
}

/**
 * Client of a running edge's local status API (`remoteingress.v1.EdgeStatus`): its state now, and its
 * events through `on(...)` (the stream starts with the first listener and survives restarts).
 */
export class RemoteIngressEdgeClient extends StreamingClient<EdgeEvents, EdgeStatusWatchEventsResponse> {
  /** The generated client, for anything the methods here do not cover. */
  readonly raw: Client<typeof EdgeStatus>;

  constructor(options: ConnectionOptions) {
    super(options);
    this.raw = createClient(EdgeStatus, this.connection.transport);
  }

  /** The edge's state now: tunnels (one per hub instance), ports, public IP, firewall. */
  async getStatus(): Promise<EdgeStatusInfo> {
    return edgeStatusFromProto(await call(() => this.raw.getStatus({})));
  }

  protected override subscribe(signal: AbortSignal, onHeader: (headers: Headers) => void) {
    return this.raw.watchEvents({}, { signal, onHeader, timeoutMs: 0 });
  }

  protected override dispatch(message: EdgeStatusWatchEventsResponse): void {
    const base: EdgeEventBase = { time: message.time && timestampDate(message.time) };
    const event = message.event;
    switch (event.case) {
      case "tunnelConnected":
        this.emit(event.case, {
          ...base,
          transport: transportName(event.value.transport),
          hubId: event.value.hubId,
          address: event.value.address,
        });
        break;
      case "tunnelDisconnected":
        this.emit(event.case, {
          ...base,
          reason: event.value.reason,
          hubId: event.value.hubId,
          address: event.value.address,
        });
        break;
      case "tunnelDraining":
        this.emit(event.case, { ...base, hubId: event.value.hubId, address: event.value.address });
        break;
      case "clientOpened": {
        const { protocol, clientAddr, edgePort, hub } = event.value;
        this.emit(event.case, { ...base, protocol, clientAddr, edgePort, hub });
        break;
      }
      case "configDisagreement":
        this.emit(event.case, { ...base, generation: Number(event.value.generation), hubs: event.value.hubs });
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
