import type { EventEmitter } from "node:events";

import { RemoteIngressEdgeClient, type EdgeEventBase, type EdgeEvents } from "./edge.js";
import { stoppedEdgeStatus, type EdgeStatusInfo } from "./status.js";
import { SupervisedBinary } from "./supervised.js";
import { freePort, type SupervisorEvents, type SupervisorOptions } from "./supervisor.js";

/** The original's `IEdgeConfig`: where the hub is and who this edge is. */
export interface IEdgeConfig {
  /** The hub's host. */
  hubHost: string;
  /** The hub's tunnel port (default 8443). */
  hubPort?: number;
  /** This edge's id. */
  edgeId: string;
  /** This edge's secret. */
  secret: string;
  /** Address the public ports listen on (default: all addresses). */
  bindAddress?: string;
  /** `tcpTls` (default), `quic`, or `quicWithFallback`. */
  transportMode?: "tcpTls" | "quic" | "quicWithFallback";
  /** The hub certificate's SHA-256 pin (a connection token carries it). */
  hubPin?: string;
}

/** What {@link RemoteIngressEdge.start} takes: a connection token, or the explicit config. */
export type EdgeStartConfig = ({ token: string; bindAddress?: string } | IEdgeConfig) & {
  /** Address of the edge's metrics (default: a free loopback port). */
  metricsAddress?: string;
  /** Further `remoteingress edge` flags. */
  extraArgs?: string[];
};

/** The events of {@link RemoteIngressEdge}: the original's names, the edge's own, and the supervisor's. */
export interface ManagedEdgeEvents extends EdgeEvents, SupervisorEvents {
  /** Ports listened on after (re)connecting. */
  portsAssigned: [EdgeEventBase & { listenPorts: number[]; listenPortsUdp: number[] }];
  /** Ports changed by a live configuration update. */
  portsUpdated: [EdgeEventBase & { listenPorts: number[]; listenPortsUdp: number[] }];
  /** A firewall configuration was applied (`error` set if it failed). */
  firewallConfigUpdated: [EdgeEventBase & { rules: number; error?: string }];
}

/** Edge events forwarded from the running binary under their own names. */
const FORWARDED: (keyof EdgeEvents)[] = [
  "tunnelConnected",
  "tunnelDisconnected",
  "tunnelDraining",
  "clientOpened",
  "configDisagreement",
  "publicIpDiscovered",
  "portsChanged",
  "configRejected",
  "firewallApplied",
  "eventsMissed",
];

/**
 * An edge run by this process, as in the original package: `start()` spawns the `remoteingress`
 * binary with its status API on a free loopback port, and a crash restarts it with exponential
 * backoff and the same configuration.
 */
export class RemoteIngressEdge extends SupervisedBinary<RemoteIngressEdgeClient, ManagedEdgeEvents> {
  private config?: EdgeStartConfig;

  constructor(options: SupervisorOptions = {}) {
    super(options, "edge");
  }

  /** Starts the edge; resolves once its status API answers (the tunnel connects by itself). */
  async start(config: EdgeStartConfig): Promise<void> {
    this.assertStopped();
    this.config = config;
    await this.supervisor.start();
  }

  /** `{ running, connected, publicIp, activeStreams, listenPorts }` and more, as plain data. */
  async getStatus(): Promise<EdgeStatusInfo> {
    const client = this.supervisor.current;
    return client ? client.getStatus() : stoppedEdgeStatus();
  }

  protected override async prepare() {
    const config = this.config;
    if (!config) {
      throw new Error("start() was not called");
    }
    const status = `127.0.0.1:${await freePort()}`;
    const args = [
      "edge",
      `--status-addr=${status}`,
      `--metrics-addr=${config.metricsAddress ?? `127.0.0.1:${await freePort()}`}`,
    ];
    if (!("token" in config)) {
      args.push(
        `--hub-host=${config.hubHost}`,
        `--hub-port=${config.hubPort ?? 8443}`,
        `--edge-id=${config.edgeId}`,
        `--transport-mode=${config.transportMode ?? "tcpTls"}`,
      );
      if (config.hubPin !== undefined) {
        args.push(`--hub-pin=${config.hubPin}`);
      }
    }
    if (config.bindAddress !== undefined) {
      args.push(`--bind-address=${config.bindAddress}`);
    }
    args.push(...(config.extraArgs ?? []));
    // Token and secret go by environment, not on the command line where `ps` shows them.
    const env: Record<string, string> =
      "token" in config ? { REMOTEINGRESS_TOKEN: config.token } : { REMOTEINGRESS_SECRET: config.secret };
    return { args, env, client: new RemoteIngressEdgeClient({ address: status }) };
  }

  protected override async probe(client: RemoteIngressEdgeClient): Promise<void> {
    await client.getStatus();
  }

  protected override async attach(client: RemoteIngressEdgeClient): Promise<void> {
    const emitter = this as EventEmitter;
    const seen = new Set<string>();
    for (const name of FORWARDED) {
      (client as EventEmitter).on(name, (...args: unknown[]) => {
        seen.add(name);
        emitter.emit(name, ...args);
      });
    }
    client.on("portsChanged", ({ update, ...ports }) => emitter.emit(update ? "portsUpdated" : "portsAssigned", ports));
    client.on("firewallApplied", (applied) => emitter.emit("firewallConfigUpdated", applied));
    await client.watching();
    // The edge connects as soon as it starts, often before the event stream is up: what it did
    // by then is told from its status instead, so that listeners always hear of it.
    const status = await client.getStatus();
    const [tunnel] = status.tunnels;
    if (status.connected && tunnel && !seen.has("tunnelConnected")) {
      emitter.emit("tunnelConnected", { transport: tunnel.transport, hubId: tunnel.hubId, address: tunnel.address });
    }
    if (status.connected && !seen.has("portsChanged")) {
      emitter.emit("portsAssigned", { listenPorts: status.listenPorts, listenPortsUdp: status.listenPortsUdp });
    }
    if (status.publicIp && !seen.has("publicIpDiscovered")) {
      emitter.emit("publicIpDiscovered", { ip: status.publicIp });
    }
  }
}
