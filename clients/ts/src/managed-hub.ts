import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import type { EventEmitter } from "node:events";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";

import type { EdgeDefinition } from "./edges.js";
import { RemoteIngressHubClient, type CreatedToken, type HubEvents, type TokenOptions } from "./hub.js";
import { stoppedHubStatus, type HubStatus } from "./status.js";
import { SupervisedBinary } from "./supervised.js";
import { freePort, type SupervisorEvents, type SupervisorOptions } from "./supervisor.js";

/** What {@link RemoteIngressHub.start} takes: the original's `IHubConfig`, and more. */
export interface IHubConfig {
  /** Port edges connect to, TCP and UDP (QUIC) (default 8443). */
  tunnelPort?: number;
  /** Where tunnelled connections go: the reverse proxy's host (default `127.0.0.1`). */
  targetHost?: string;
  /** The hub's certificate and key instead of the generated self-signed one. */
  tls?: { certPem?: string; keyPem?: string };
  /** Address the tunnel port listens on (default: all addresses). */
  listenAddress?: string;
  /** Host put into connection tokens (default: the binary's, the machine's hostname). */
  publicHost?: string;
  /**
   * Where the hub keeps its generated certificate, whose pin edges check. Default: a temporary
   * directory kept across crash restarts and removed by `stop()`; set it to keep the hub's
   * identity across restarts of your program.
   */
  stateDir?: string;
  /** Address of the hub's metrics (default: a free loopback port). */
  metricsAddress?: string;
  /** Further `remoteingress hub` flags. */
  extraArgs?: string[];
}

/** The events of {@link RemoteIngressHub}: the hub's own and the supervisor's. */
export type ManagedHubEvents = HubEvents & SupervisorEvents;

/** Hub events forwarded from the running binary. */
const FORWARDED: (keyof HubEvents)[] = [
  "edgeConnected",
  "edgeDisconnected",
  "streamOpened",
  "streamClosed",
  "udpSessionOpened",
  "udpSessionClosed",
  "configPushed",
  "configApplied",
  "authFailed",
  "openRefused",
  "configReloaded",
  "eventsMissed",
];

/**
 * A hub run by this process, as in the original package: `start()` spawns the `remoteingress`
 * binary with its admin API on a free loopback port behind a generated token, and a crash
 * restarts it with exponential backoff, re-applying the last `updateAllowedEdges`.
 */
export class RemoteIngressHub extends SupervisedBinary<RemoteIngressHubClient, ManagedHubEvents> {
  private readonly adminToken = randomBytes(32).toString("hex");
  private config: IHubConfig = {};
  private tunnelPort = 8443;
  private stateDir?: { path: string; temporary: boolean };
  private allowedEdges?: EdgeDefinition[];
  private certificatePin?: string;

  constructor(options: SupervisorOptions = {}) {
    super(options, "hub");
  }

  /** Starts the hub; resolves once its admin API answers. */
  async start(config: IHubConfig = {}): Promise<void> {
    this.assertStopped();
    if (Boolean(config.tls?.certPem) !== Boolean(config.tls?.keyPem)) {
      throw new Error("tls needs both certPem and keyPem");
    }
    this.config = config;
    this.tunnelPort = config.tunnelPort ?? 8443;
    const temporary = config.stateDir === undefined;
    const path = config.stateDir ?? mkdtempSync(join(tmpdir(), "remoteingress-hub-"));
    mkdirSync(path, { recursive: true, mode: 0o700 });
    this.stateDir = { path, temporary };
    try {
      await this.supervisor.start();
    } catch (error) {
      this.removeStateDir();
      throw error;
    }
  }

  /** Stops the hub gracefully (SIGTERM, then its grace period). Harmless when not running. */
  override async stop(): Promise<void> {
    await super.stop();
    this.removeStateDir();
  }

  /** Sets the authorised edges; they are re-applied after a crash restart. */
  async updateAllowedEdges(edges: EdgeDefinition[]): Promise<void> {
    await this.client.updateAllowedEdges(edges);
    this.allowedEdges = edges;
  }

  /** `{ running, tunnelPort, connectedEdges }` and more, as plain data. */
  async getStatus(): Promise<HubStatus> {
    const client = this.supervisor.current;
    return client ? client.getStatus() : stoppedHubStatus(this.tunnelPort);
  }

  /**
   * SHA-256 of the hub's certificate, lowercase hex, once it has started: add it as `pin` to a
   * token made with `encodeConnectionToken` so that the edge verifies this hub.
   */
  get pin(): string | undefined {
    return this.certificatePin;
  }

  /**
   * The token an edge starts with (`edge.start({ token })`), carrying the hub's certificate pin.
   * The host in it is, in order: `options.hubHost`, `publicHost` of `start()`, its
   * `listenAddress` when that is one address, else this machine's host name.
   */
  async createConnectionToken(edgeId: string, options: string | TokenOptions = {}): Promise<CreatedToken> {
    const given = typeof options === "string" ? { secret: options } : options;
    const hubHost = given.hubHost ?? this.config.publicHost ?? this.defaultHost();
    return this.client.createConnectionToken(edgeId, { ...given, hubHost });
  }

  private defaultHost(): string {
    const listen = this.config.listenAddress;
    const wildcard = listen === undefined || listen === "0.0.0.0" || listen === "::" || listen === "[::]";
    return wildcard ? hostname() : listen;
  }

  protected override async prepare() {
    const config = this.config;
    const stateDir = this.stateDir?.path ?? "";
    const admin = `127.0.0.1:${await freePort()}`;
    const args = [
      "hub",
      `--tunnel-port=${this.tunnelPort}`,
      `--target-host=${config.targetHost ?? "127.0.0.1"}`,
      `--admin-addr=${admin}`,
      `--metrics-addr=${config.metricsAddress ?? `127.0.0.1:${await freePort()}`}`,
      `--state-dir=${stateDir}`,
    ];
    if (config.listenAddress !== undefined) {
      args.push(`--listen-address=${config.listenAddress}`);
    }
    if (config.publicHost !== undefined) {
      args.push(`--public-host=${config.publicHost}`);
    }
    if (config.tls?.certPem && config.tls.keyPem) {
      const cert = join(stateDir, "supervised-cert.pem");
      const key = join(stateDir, "supervised-key.pem");
      writeFileSync(cert, config.tls.certPem, { mode: 0o600 });
      writeFileSync(key, config.tls.keyPem, { mode: 0o600 });
      args.push(`--tls-cert=${cert}`, `--tls-key=${key}`);
    }
    args.push(...(config.extraArgs ?? []));
    const client = new RemoteIngressHubClient({ address: admin, token: this.adminToken });
    return { args, env: { REMOTEINGRESS_ADMIN_TOKEN: this.adminToken }, client };
  }

  protected override async probe(client: RemoteIngressHubClient): Promise<void> {
    this.certificatePin = (await client.getStatus()).pin;
  }

  protected override async attach(client: RemoteIngressHubClient, restart: boolean): Promise<void> {
    const emitter = this as EventEmitter;
    for (const name of FORWARDED) {
      (client as EventEmitter).on(name, (...args: unknown[]) => emitter.emit(name, ...args));
    }
    await client.watching();
    if (restart && this.allowedEdges) {
      await client.updateAllowedEdges(this.allowedEdges);
    }
  }

  private removeStateDir(): void {
    if (this.stateDir?.temporary) {
      rmSync(this.stateDir.path, { recursive: true, force: true });
    }
    this.stateDir = undefined;
  }
}
