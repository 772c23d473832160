import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";

import { Action, Direction, FirewallConfigSchema, Protocol } from "./gen/remoteingress/v1/config_pb.js";
import type { Edge, EdgeInfo } from "./gen/remoteingress/v1/hub_pb.js";
import { EdgeSchema } from "./gen/remoteingress/v1/hub_pb.js";
import { RemoteIngressError } from "./errors.js";

/** A transport protocol in firewall entries. */
export type ProtocolName = "tcp" | "udp";

/** Per-port rate limit, as in the original system's `firewallConfig.rateLimits`. */
export interface RateLimitDefinition {
  /** Unique id within the config. */
  id: string;
  /** Destination port. */
  port: number;
  /** Protocol; both when absent. */
  protocol?: ProtocolName;
  /** `N/second`, `N/minute` or `N/hour`. */
  rate: string;
  /** Packets allowed above the rate in a burst. */
  burst?: number;
  /** Limit each source address separately. */
  perSourceIP?: boolean;
}

/** An explicit firewall rule, as in the original system's `firewallConfig.rules`. */
export interface FirewallRuleDefinition {
  /** Unique id within the config. */
  id: string;
  /** Hook the rule applies to; the hub accepts only "input" (output and forward would reach the host's own traffic). */
  direction: "input" | "output" | "forward";
  /** Verdict. */
  action: "accept" | "drop" | "reject";
  /** Source address or CIDR to match; any when absent. */
  sourceIP?: string;
  /** Destination port to match: required by the hub, and one the edge listens on for `protocol`. */
  destPort?: number;
  /** Protocol to match; required with `destPort`. */
  protocol?: ProtocolName;
  /** Free text kept with the rule. */
  comment?: string;
}

/** nftables rules an edge applies. */
export interface FirewallConfigDefinition {
  /** Addresses or CIDRs dropped on input. */
  blockedIps?: string[];
  /** Per-port rate limits. */
  rateLimits?: RateLimitDefinition[];
  /** Explicit rules. */
  rules?: FirewallRuleDefinition[];
}

/** An edge the hub admits, in the original TypeScript API's shape (and the edges file's). */
export interface EdgeDefinition {
  /** Edge id, `[A-Za-z0-9._-]{1,128}`. */
  id: string;
  /** Shared secret. */
  secret: string;
  /** TCP ports the edge listens on. */
  listenPorts: number[];
  /** UDP ports the edge listens on. */
  listenPortsUdp?: number[];
  /** Target port per edge port, where they differ. */
  targetPorts?: Record<number, number>;
  /** Target host per edge port, where it is not the hub's target host (a Service's cluster IP, say). */
  targetHosts?: Record<number, string>;
  /** Seconds between STUN refreshes (default 300). */
  stunIntervalSecs?: number;
  /** Firewall rules for the edge. */
  firewallConfig?: FirewallConfigDefinition;
  /**
   * How new this configuration is, the same on every hub serving the edge (edges apply only a
   * newer one). Absent: the hub counts changes itself. Required by hubs run as replicas.
   */
  generation?: number;
}

/** A configured edge as the hub reports it (never with its secret). */
export interface EdgeState extends Omit<EdgeDefinition, "secret"> {
  /** Whether its tunnel is up. */
  connected: boolean;
  /** Version of the configuration the hub wants it to run. */
  desiredConfigVersion: number;
  /** Version it last acknowledged (0: none yet). */
  appliedConfigVersion: number;
  /** Why it rejected its last configuration, if it did. */
  lastConfigError?: string;
  /** Generation of the configuration the hub wants it to run. */
  generation: number;
}

const PROTOCOLS: Record<ProtocolName, Protocol> = { tcp: Protocol.TCP, udp: Protocol.UDP };
const DIRECTIONS = { input: Direction.INPUT, output: Direction.OUTPUT, forward: Direction.FORWARD };
const ACTIONS = { accept: Action.ACCEPT, drop: Action.DROP, reject: Action.REJECT };

function word<T>(table: Record<string, T>, value: string | undefined, edgeId: string, field: string, fallback?: T): T {
  if (value === undefined && fallback !== undefined) {
    return fallback;
  }
  if (value !== undefined && Object.hasOwn(table, value)) {
    return table[value] as T;
  }
  throw new RemoteIngressError(
    Code.InvalidArgument,
    `edge "${edgeId}": ${field}: ${JSON.stringify(value)} is not one of ${Object.keys(table).join(", ")}`,
  );
}

/** The API message for an edge definition; unknown protocol/direction/action words throw. */
export function edgeToProto(edge: EdgeDefinition): Edge {
  const firewall = edge.firewallConfig;
  return create(EdgeSchema, {
    id: edge.id,
    secret: edge.secret,
    listenPorts: edge.listenPorts ?? [],
    listenPortsUdp: edge.listenPortsUdp ?? [],
    targetPorts: Object.fromEntries(Object.entries(edge.targetPorts ?? {}).map(([from, to]) => [Number(from), to])),
    targetHosts: Object.fromEntries(Object.entries(edge.targetHosts ?? {}).map(([from, host]) => [Number(from), host])),
    stunIntervalSecs: BigInt(edge.stunIntervalSecs ?? 0),
    generation: edge.generation === undefined ? undefined : BigInt(edge.generation),
    firewallConfig:
      firewall &&
      create(FirewallConfigSchema, {
        blockedIps: firewall.blockedIps ?? [],
        rateLimits: (firewall.rateLimits ?? []).map((limit, i) => ({
          id: limit.id,
          port: limit.port,
          protocol: word(PROTOCOLS, limit.protocol, edge.id, `firewallConfig.rateLimits[${i}].protocol`, Protocol.UNSPECIFIED),
          rate: limit.rate,
          burst: limit.burst,
          perSourceIp: limit.perSourceIP ?? false,
        })),
        rules: (firewall.rules ?? []).map((rule, i) => ({
          id: rule.id,
          direction: word(DIRECTIONS, rule.direction, edge.id, `firewallConfig.rules[${i}].direction`),
          action: word(ACTIONS, rule.action, edge.id, `firewallConfig.rules[${i}].action`),
          sourceIp: rule.sourceIP ?? "",
          destPort: rule.destPort,
          protocol: word(PROTOCOLS, rule.protocol, edge.id, `firewallConfig.rules[${i}].protocol`, Protocol.UNSPECIFIED),
          comment: rule.comment ?? "",
        })),
      }),
  });
}

/** The word for an enum value in `table`; undefined for values it lacks (UNSPECIFIED). */
function nameOf<T extends string>(table: Record<T, number>, value: number): T | undefined {
  return (Object.keys(table) as T[]).find((key) => table[key] === value);
}

/** The original-shaped view of an edge the hub reports. */
export function edgeFromProto(info: EdgeInfo): EdgeState {
  const firewall = info.firewallConfig;
  const state: EdgeState = {
    id: info.id,
    listenPorts: info.listenPorts,
    listenPortsUdp: info.listenPortsUdp,
    targetPorts: info.targetPorts,
    targetHosts: info.targetHosts,
    stunIntervalSecs: Number(info.stunIntervalSecs),
    connected: info.connected,
    desiredConfigVersion: Number(info.desiredConfigVersion),
    appliedConfigVersion: Number(info.appliedConfigVersion),
    generation: Number(info.generation),
  };
  if (info.lastConfigError !== "") {
    state.lastConfigError = info.lastConfigError;
  }
  if (firewall) {
    state.firewallConfig = {
      blockedIps: firewall.blockedIps,
      rateLimits: firewall.rateLimits.map((limit) => ({
        id: limit.id,
        port: limit.port,
        protocol: nameOf(PROTOCOLS, limit.protocol),
        rate: limit.rate,
        burst: limit.burst,
        perSourceIP: limit.perSourceIp,
      })),
      rules: firewall.rules.map((rule) => ({
        id: rule.id,
        // The hub refuses rules without a direction or an action, so both are known words.
        direction: nameOf(DIRECTIONS, rule.direction)!,
        action: nameOf(ACTIONS, rule.action)!,
        sourceIP: rule.sourceIp || undefined,
        destPort: rule.destPort,
        protocol: nameOf(PROTOCOLS, rule.protocol),
        comment: rule.comment || undefined,
      })),
    };
  }
  return state;
}
