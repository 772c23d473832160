import { durationMs, timestampDate, type Duration, type Timestamp } from "@bufbuild/protobuf/wkt";

import { Transport } from "./gen/remoteingress/v1/config_pb.js";
import {
  FirewallState,
  TunnelState,
  type EdgeStatusGetStatusResponse,
  type Tunnel,
} from "./gen/remoteingress/v1/edge_pb.js";
import type { ConnectedEdge, GetStatusResponse } from "./gen/remoteingress/v1/hub_pb.js";

/** A transport by the original system's name; `""` when not reported. */
export type TransportName = "tcpTls" | "quic" | "";

/** The original system's name of a transport. */
export function transportName(transport: Transport): TransportName {
  switch (transport) {
    case Transport.TCP_TLS:
      return "tcpTls";
    case Transport.QUIC:
      return "quic";
    default:
      return "";
  }
}

/**
 * A uint64 counter as a number. Counters stay exact up to 2^53 (9 PB of traffic, say); past that
 * they lose precision rather than throw.
 */
export function counter(value: bigint): number {
  return Number(value);
}

/** One edge's tunnel to a hub, in {@link HubStatus.connectedEdges}. */
export interface ConnectedEdgeInfo {
  /** The edge's id. */
  edgeId: string;
  /** When the tunnel came up. */
  connectedSince?: Date;
  /** Address the edge connected from. */
  remoteAddr: string;
  /** Transport in use. */
  transport: TransportName;
  /** TCP streams open now. */
  activeStreams: number;
  /** UDP sessions open now. */
  activeUdpSessions: number;
  /** Payload bytes received from the edge. */
  bytesIn: number;
  /** Payload bytes sent to the edge. */
  bytesOut: number;
  /** Public address the edge discovered by STUN; null if unknown. */
  publicIp: string | null;
  /** Last PING round trip in milliseconds; null until measured. */
  rttMs: number | null;
}

/** A hub's state: the original's `{ running, tunnelPort, connectedEdges }` and more. */
export interface HubStatus {
  /** Whether the hub is up (for a supervised hub: whether its binary is alive). */
  running: boolean;
  /** Port edges connect to. */
  tunnelPort: number;
  /** Tunnels that are up (an edge with tunnels to several hubs may reach this one twice). */
  connectedEdges: ConnectedEdgeInfo[];
  /** This hub instance's id, as edges see it. */
  hubId: string;
  /** True once the hub has begun draining. */
  draining: boolean;
  /** SHA-256 of the hub's certificate, lowercase hex: the pin a connection token carries. */
  pin: string;
}

/** One of an edge's tunnels, in {@link EdgeStatusInfo.tunnels}. */
export interface TunnelInfo {
  /** The hub instance's id (empty for an original hub). */
  hubId: string;
  /** The address dialled, host:port. */
  address: string;
  /** Its transport. */
  transport: TransportName;
  /** Whether it takes new streams (`active`), its hub is shutting down (`draining`), or its hub went silent or left an open unconfirmed (`suspect`). */
  state: "active" | "draining" | "suspect" | "";
  /** TCP streams open on it. */
  activeStreams: number;
  /** UDP sessions open on it. */
  activeUdpSessions: number;
  /** Last round trip in milliseconds; null until known. */
  rttMs: number | null;
  /** When it came up. */
  connectedSince?: Date;
}

/** An edge's state: the original's `{ running, connected, publicIp, activeStreams, listenPorts }` and more. */
export interface EdgeStatusInfo {
  /** Whether the edge is up (for a supervised edge: whether its binary is alive). */
  running: boolean;
  /** Whether a tunnel is up. */
  connected: boolean;
  /** Public address discovered by STUN; null if unknown. */
  publicIp: string | null;
  /** TCP streams open now. */
  activeStreams: number;
  /** TCP ports listened on. */
  listenPorts: number[];
  /** UDP ports listened on. */
  listenPortsUdp: number[];
  /** UDP sessions open now. */
  activeUdpSessions: number;
  /** Transport in use. */
  transport: TransportName;
  /** Firewall state: `applied`, `unavailable` (no nftables here, or turned off), `error`, or `""`. */
  firewall: "applied" | "unavailable" | "error" | "";
  /** Detail for the firewall state. */
  firewallMessage: string;
  /** Last connection or configuration error; empty if none. */
  lastError: string;
  /** Every tunnel, oldest first. */
  tunnels: TunnelInfo[];
  /** Generation of the configuration in force (0: none). */
  generation: number;
}

function dateOf(timestamp: Timestamp | undefined): Date | undefined {
  return timestamp && timestampDate(timestamp);
}

function millisOf(duration: Duration | undefined): number | null {
  return duration ? durationMs(duration) : null;
}

/** The plain form of a hub's GetStatus answer. */
export function hubStatusFromProto(response: GetStatusResponse): HubStatus {
  return {
    running: response.running,
    tunnelPort: response.tunnelPort,
    connectedEdges: response.connectedEdges.map(connectedEdgeFromProto),
    hubId: response.hubId,
    draining: response.draining,
    pin: response.pin,
  };
}

function connectedEdgeFromProto(edge: ConnectedEdge): ConnectedEdgeInfo {
  return {
    edgeId: edge.id,
    connectedSince: dateOf(edge.connectedSince),
    remoteAddr: edge.remoteAddr,
    transport: transportName(edge.transport),
    activeStreams: edge.activeStreams,
    activeUdpSessions: edge.activeUdpSessions,
    bytesIn: counter(edge.bytesIn),
    bytesOut: counter(edge.bytesOut),
    publicIp: edge.publicIp || null,
    rttMs: millisOf(edge.rtt),
  };
}

const FIREWALL_STATES: Record<FirewallState, EdgeStatusInfo["firewall"]> = {
  [FirewallState.UNSPECIFIED]: "",
  [FirewallState.APPLIED]: "applied",
  [FirewallState.UNAVAILABLE]: "unavailable",
  [FirewallState.ERROR]: "error",
};

const TUNNEL_STATES: Record<TunnelState, TunnelInfo["state"]> = {
  [TunnelState.UNSPECIFIED]: "",
  [TunnelState.ACTIVE]: "active",
  [TunnelState.DRAINING]: "draining",
  [TunnelState.SUSPECT]: "suspect",
};

/** The plain form of an edge's GetStatus answer. */
export function edgeStatusFromProto(response: EdgeStatusGetStatusResponse): EdgeStatusInfo {
  return {
    running: response.running,
    connected: response.connected,
    publicIp: response.publicIp || null,
    activeStreams: response.activeStreams,
    listenPorts: [...response.listenPorts],
    listenPortsUdp: [...response.listenPortsUdp],
    activeUdpSessions: response.activeUdpSessions,
    transport: transportName(response.transport),
    firewall: FIREWALL_STATES[response.firewall] ?? "",
    firewallMessage: response.firewallMessage,
    lastError: response.lastError,
    tunnels: response.tunnels.map(tunnelFromProto),
    generation: counter(response.generation),
  };
}

function tunnelFromProto(tunnel: Tunnel): TunnelInfo {
  return {
    hubId: tunnel.hubId,
    address: tunnel.address,
    transport: transportName(tunnel.transport),
    state: TUNNEL_STATES[tunnel.state] ?? "",
    activeStreams: tunnel.activeStreams,
    activeUdpSessions: tunnel.activeUdpSessions,
    rttMs: millisOf(tunnel.rtt),
    connectedSince: dateOf(tunnel.connectedSince),
  };
}

/** A hub's status while its binary is not running. */
export function stoppedHubStatus(tunnelPort: number): HubStatus {
  return { running: false, tunnelPort, connectedEdges: [], hubId: "", draining: false, pin: "" };
}

/** An edge's status while its binary is not running. */
export function stoppedEdgeStatus(): EdgeStatusInfo {
  return {
    running: false,
    connected: false,
    publicIp: null,
    activeStreams: 0,
    listenPorts: [],
    listenPortsUdp: [],
    activeUdpSessions: 0,
    transport: "",
    firewall: "",
    firewallMessage: "",
    lastError: "",
    tunnels: [],
    generation: 0,
  };
}
