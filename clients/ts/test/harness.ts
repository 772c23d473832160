/** Real hub and edge processes on loopback for the client tests. */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { freePort } from "../src/supervisor.js";

/** The repository root (this file runs from clients/ts/dist/test). */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");

/** The remoteingress binary: $REMOTEINGRESS_BIN, or the workspace's debug build. */
export const BINARY = process.env.REMOTEINGRESS_BIN ?? join(REPO, "target/debug/remoteingress");

/** The shared test vectors. */
export const VECTORS = JSON.parse(readFileSync(join(REPO, "testdata/vectors.json"), "utf8"));

/** Edge listeners live on 127.0.0.2 so they never collide with anything on 127.0.0.1. */
export const EDGE_IP = "127.0.0.2";

/** A TCP port free on `host` right now. */
export { freePort };

/**
 * Polls `check` until it returns a value other than undefined; fails after 20 s, saying `what`
 * (a function is called then, so that it can show the processes' output at that moment).
 */
export async function eventually<T>(
  what: string | (() => string),
  check: () => Promise<T | undefined> | T | undefined,
): Promise<T> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const value = await check();
    if (value !== undefined) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${typeof what === "string" ? what : what()}`);
    }
    await new Promise((ok) => setTimeout(ok, 25));
  }
}

/** Whether something accepts TCP connections on host:port. */
export function accepts(host: string, port: number): Promise<boolean> {
  return new Promise((ok) => {
    const socket = new Socket();
    socket.once("connect", () => {
      socket.destroy();
      ok(true);
    });
    socket.once("error", () => ok(false));
    socket.connect(port, host);
  });
}

/** A process of the binary, its output kept for failure messages. */
export class Process {
  readonly child: ChildProcess;
  output = "";

  constructor(args: string[], env: Record<string, string> = {}) {
    this.child = spawn(BINARY, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString()).slice(-20_000);
    };
    this.child.stdout?.on("data", keep);
    this.child.stderr?.on("data", keep);
  }

  /** Kills the process and waits for it to exit. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return;
    }
    const exited = new Promise((ok) => this.child.once("exit", ok));
    this.child.kill("SIGKILL");
    await exited;
  }
}

/** The admin token the test hubs require. */
export const ADMIN_TOKEN = "test-admin-token";

/** A hub process with fixed ports and state directory, so it can be restarted in place. */
export class Hub {
  readonly stateDir = mkdtempSync(join(tmpdir(), "remoteingress-ts-"));
  process?: Process;

  private constructor(
    readonly tunnelPort: number,
    readonly adminPort: number,
    readonly metricsPort: number,
  ) {}

  /** Starts a hub on free ports and waits until its admin API accepts connections. */
  static async start(): Promise<Hub> {
    const hub = new Hub(await freePort(), await freePort(), await freePort());
    await hub.restart();
    return hub;
  }

  /** The admin API address. */
  get address(): string {
    return `127.0.0.1:${this.adminPort}`;
  }

  /** (Re)starts the process and waits for the admin API. */
  async restart(): Promise<void> {
    await this.process?.stop();
    const process = new Process(
      [
        "hub",
        "--listen-address=127.0.0.1",
        `--tunnel-port=${this.tunnelPort}`,
        `--admin-addr=127.0.0.1:${this.adminPort}`,
        `--metrics-addr=127.0.0.1:${this.metricsPort}`,
        `--state-dir=${this.stateDir}`,
        "--public-host=127.0.0.1",
        // The clients never need QUIC; without it no UDP port has to be free as well.
        "--no-quic",
      ],
      { REMOTEINGRESS_ADMIN_TOKEN: ADMIN_TOKEN },
    );
    this.process = process;
    await eventually(() => `the hub's admin API\n${process.output}`, async () => {
      if (process.child.exitCode !== null) {
        throw new Error(`the hub exited:\n${process.output}`);
      }
      return (await accepts("127.0.0.1", this.adminPort)) ? true : undefined;
    });
  }

  /** Stops the process and removes its state. */
  async stop(): Promise<void> {
    await this.process?.stop();
    rmSync(this.stateDir, { recursive: true, force: true });
  }
}

/** An edge process started with a connection token, its status API on a free port. */
export class Edge {
  private constructor(
    readonly process: Process,
    readonly statusPort: number,
  ) {}

  /** Starts an edge that listens on {@link EDGE_IP} and waits until its status API answers. */
  static async start(token: string): Promise<Edge> {
    const statusPort = await freePort();
    const process = new Process([
      "edge",
      `--token=${token}`,
      `--bind-address=${EDGE_IP}`,
      "--firewall=off",
      "--no-stun",
      "--reconnect-min-ms=50",
      "--reconnect-max-secs=1",
      `--status-addr=127.0.0.1:${statusPort}`,
      `--metrics-addr=127.0.0.1:${await freePort()}`,
    ]);
    await eventually("the edge's status API", async () => ((await accepts("127.0.0.1", statusPort)) ? true : undefined));
    return new Edge(process, statusPort);
  }

  /** The status API address. */
  get address(): string {
    return `127.0.0.1:${this.statusPort}`;
  }
}
