import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { createInterface } from "node:readline";

import { findBinary } from "./binary.js";
import { sleep } from "./watch.js";

/** How a supervised binary is found, restarted and stopped. */
export interface SupervisorOptions {
  /** The `remoteingress` binary; else `$REMOTEINGRESS_BIN`, else `remoteingress` on PATH. */
  binaryPath?: string;
  /** Restarts tried after a crash before `crashRecoveryFailed` (default 10). */
  maxRestartAttempts?: number;
  /** Delay before the first restart, doubled for each one that fails (default 1,000 ms). */
  restartDelayMs?: number;
  /** Longest delay between restarts (default 30,000 ms). */
  maxRestartDelayMs?: number;
  /** How long the binary may take to answer on its API once spawned (default 30,000 ms). */
  startTimeoutMs?: number;
  /**
   * How long `stop()` waits after SIGTERM before SIGKILL (default 35,000 ms: the binary's own
   * 30 s grace for open connections, and a margin).
   */
  stopTimeoutMs?: number;
  /** Extra environment for the binary (e.g. `REMOTEINGRESS_LOG_LEVEL`). */
  env?: Record<string, string>;
  /**
   * Receives each of the binary's log records (which are also emitted as `log` events), by
   * level: `console` works, as does any object with some of these methods.
   */
  logger?: Logger;
}

/** The binary's log levels, most severe first. */
export type LogLevel = "error" | "warn" | "info" | "debug" | "trace";

/** Where {@link SupervisorOptions.logger} sends records: a method per level, each optional. */
export type Logger = Partial<Record<LogLevel, (message: string, fields: Record<string, unknown>) => void>>;

/** One log line of the binary, parsed. */
export interface LogRecord {
  /** Its level. */
  level: LogLevel;
  /** The message. */
  message: string;
  /** Its structured fields (`edgeId`-style keys as the binary names them, e.g. `edge_id`). */
  fields: Record<string, unknown>;
  /** The Rust module that logged it (empty for plain output lines). */
  target: string;
  /** When it was logged. */
  time: Date;
}

/** Payload of `crashRecovered`: how the binary ended, and the restarts it took to come back. */
export interface CrashRecovered {
  /** Restart attempts, the successful one included. */
  attempts: number;
  /** Exit code of the crash, or null if a signal ended it. */
  exitCode: number | null;
  /** Signal that ended it, or null. */
  signal: string | null;
}

/** Payload of `crashRecoveryFailed`: the attempts made and why the last one failed. */
export interface CrashRecoveryFailed {
  /** Restart attempts made. */
  attempts: number;
  /** Why the last attempt failed, with the binary's output. */
  reason: string;
}

/** The events every supervised binary emits. */
export interface SupervisorEvents {
  /** The binary crashed and runs again; the last allowed edges / config are re-applied. */
  crashRecovered: [CrashRecovered];
  /** The binary crashed and every restart failed; it is not running. */
  crashRecoveryFailed: [CrashRecoveryFailed];
  /** The binary logged a line. */
  log: [LogRecord];
}

/** One launch of the binary: its arguments, environment, and the client that reaches it. */
export interface Launch<C> {
  args: string[];
  env: Record<string, string>;
  client: C;
}

/** What the supervisor needs from the hub or edge it runs. */
export interface SupervisedKind<C extends { close(): Promise<void> }> {
  /** Arguments for a new process (with fresh free ports) and a client for it. */
  prepare(): Promise<Launch<C>>;
  /** Resolves once the process answers through `client`; rejects while it does not yet. */
  probe(client: C): Promise<void>;
  /** Runs once the process answers: attach event listeners, re-apply state after a restart. */
  ready(client: C, restart: boolean): Promise<void>;
  /** Emits a supervisor event on the owner. */
  emit<K extends keyof SupervisorEvents>(event: K, ...args: SupervisorEvents[K]): void;
}

/** How a process ended. */
interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  error?: Error;
}

/** Output kept per process for error messages: its start (where a fatal error is told, before
 * any backtrace) and its end. */
const OUTPUT_HEAD = 4_000;
const OUTPUT_TAIL = 4_000;
/** Pause between readiness probes. */
const PROBE_INTERVAL_MS = 50;

/**
 * Runs the `remoteingress` binary: spawns it, waits until its API answers, restarts it with
 * exponential backoff when it exits without being asked to, and stops it with SIGTERM (or, when
 * this process ends without calling `stop()`, by closing the binary's standard input).
 */
export class Supervisor<C extends { close(): Promise<void> }> {
  private child?: ChildProcess;
  private client?: C;
  private output = { head: "", tail: "" };
  private stopping = false;
  private recovery?: Promise<void>;
  private abort = new AbortController();

  constructor(
    private readonly kind: SupervisedKind<C>,
    private readonly options: SupervisorOptions,
  ) {}

  /** Whether the binary is alive and answered on its API. */
  get running(): boolean {
    return this.client !== undefined;
  }

  /** The binary's process id while it runs. */
  get pid(): number | undefined {
    return this.client ? this.child?.pid : undefined;
  }

  /** The client of the running binary, if it runs. */
  get current(): C | undefined {
    return this.client;
  }

  /** Whether the binary runs or is being restarted. */
  get started(): boolean {
    return this.child !== undefined || this.recovery !== undefined;
  }

  /** Spawns the binary and resolves once it answers; rejects with its output if it does not. */
  async start(): Promise<void> {
    if (this.started) {
      throw new Error("already started");
    }
    const binary = findBinary(this.options.binaryPath);
    this.stopping = false;
    this.abort = new AbortController();
    await this.launch(binary, false);
  }

  /** SIGTERM, then SIGKILL after `stopTimeoutMs`; resolves once the binary has exited. Harmless twice. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.abort.abort();
    await this.recovery;
    const child = this.child;
    if (!child) {
      return;
    }
    const exited = new Promise((resolve) => child.once("exit", resolve));
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), this.options.stopTimeoutMs ?? 35_000);
      await exited;
      clearTimeout(timer);
    }
    await this.forget(child);
  }

  private async launch(binary: string, restart: boolean): Promise<void> {
    const { args, env, client } = await this.kind.prepare();
    // The binary shuts down when its standard input ends: this process holds the only write end,
    // so however this process ends (even by SIGKILL), the binary ends with it.
    const child = spawn(binary, args, {
      env: {
        ...process.env,
        ...this.options.env,
        ...env,
        REMOTEINGRESS_EXIT_ON_STDIN_CLOSE: "true",
        REMOTEINGRESS_LOG_FORMAT: "json",
      },
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.output = { head: "", tail: "" };
    const keep = (text: string) => {
      const output = this.output;
      const room = OUTPUT_HEAD - output.head.length;
      output.head += text.slice(0, Math.max(room, 0));
      output.tail = (output.tail + text.slice(Math.max(room, 0))).slice(-OUTPUT_TAIL);
    };
    const log = (line: string) => {
      const record = parseLogLine(line);
      keep(`${formatRecord(record)}\n`);
      this.kind.emit("log", record);
      this.options.logger?.[record.level]?.(record.message, record.fields);
    };
    for (const stream of [child.stdout, child.stderr]) {
      if (stream) {
        createInterface({ input: stream, crlfDelay: Infinity }).on("line", log);
      }
    }
    const exited = new Promise<Exit>((resolve) => {
      child.once("exit", (code, signal) => resolve({ code, signal }));
      child.once("error", (error) => resolve({ code: null, signal: null, error }));
    });
    try {
      await this.waitUntilReady(client, exited);
      await this.kind.ready(client, restart);
    } catch (error) {
      child.kill("SIGKILL");
      await exited;
      await client.close();
      throw new Error(`remoteingress ${args[0]} did not start: ${message(error)}${this.outputNote()}`);
    }
    this.child = child;
    this.client = client;
    void exited.then((exit) => this.onExit(child, exit, binary));
  }

  private async waitUntilReady(client: C, exited: Promise<Exit>): Promise<void> {
    let exit: Exit | undefined;
    void exited.then((e) => (exit = e));
    const deadline = Date.now() + (this.options.startTimeoutMs ?? 30_000);
    for (;;) {
      if (exit) {
        throw new Error(describeExit(exit));
      }
      if (this.stopping) {
        throw new Error("stopped while starting");
      }
      try {
        await this.kind.probe(client);
        return;
      } catch (error) {
        if (Date.now() > deadline) {
          throw new Error(`no answer on its API within the start timeout (${message(error)})`);
        }
      }
      await sleep(PROBE_INTERVAL_MS, this.abort.signal);
    }
  }

  private async forget(child: ChildProcess): Promise<void> {
    if (this.child !== child) {
      return;
    }
    const client = this.client;
    this.child = undefined;
    this.client = undefined;
    await client?.close();
  }

  private async onExit(child: ChildProcess, exit: Exit, binary: string): Promise<void> {
    if (this.stopping || this.child !== child) {
      return;
    }
    await this.forget(child);
    this.recovery = this.recover(exit, binary).finally(() => (this.recovery = undefined));
  }

  private async recover(crash: Exit, binary: string): Promise<void> {
    const attempts = this.options.maxRestartAttempts ?? 10;
    let delay = this.options.restartDelayMs ?? 1_000;
    let reason = `${describeExit(crash)}${this.outputNote()}`;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      await sleep(delay, this.abort.signal);
      if (this.stopping) {
        return;
      }
      try {
        await this.launch(binary, true);
        this.kind.emit("crashRecovered", { attempts: attempt, exitCode: crash.code, signal: crash.signal });
        return;
      } catch (error) {
        reason = message(error);
      }
      delay = Math.min(delay * 2, this.options.maxRestartDelayMs ?? 30_000);
    }
    this.kind.emit("crashRecoveryFailed", { attempts, reason });
  }

  private outputNote(): string {
    const { head, tail } = this.output;
    const output = (tail.length < OUTPUT_TAIL ? head + tail : `${head}\n[…]\n${tail}`).trim();
    return output ? `\n--- its output:\n${output}` : "";
  }
}

const LEVELS: readonly string[] = ["error", "warn", "info", "debug", "trace"] satisfies LogLevel[];

/**
 * A line of the binary's output: a JSON log record (`--log-format json`, which the package sets)
 * or, for what it prints for people (its pin, its addresses), plain text logged as `info`.
 */
export function parseLogLine(line: string): LogRecord {
  try {
    const parsed: unknown = JSON.parse(line);
    if (typeof parsed === "object" && parsed !== null && "level" in parsed) {
      const json = parsed as { level?: unknown; fields?: unknown; target?: unknown; timestamp?: unknown };
      const all: Record<string, unknown> =
        typeof json.fields === "object" && json.fields !== null ? (json.fields as Record<string, unknown>) : {};
      const { message, ...fields } = all;
      const level = String(json.level).toLowerCase();
      const time = typeof json.timestamp === "string" ? new Date(json.timestamp) : new Date();
      return {
        level: LEVELS.includes(level) ? (level as LogLevel) : "info",
        message: typeof message === "string" ? message : JSON.stringify(message ?? ""),
        fields,
        target: typeof json.target === "string" ? json.target : "",
        time: Number.isNaN(time.getTime()) ? new Date() : time,
      };
    }
  } catch {
    // Not JSON: a line printed for people.
  }
  return { level: "info", message: line, fields: {}, target: "", time: new Date() };
}

/** A record as one line of text, for error messages. */
function formatRecord(record: LogRecord): string {
  const fields = Object.entries(record.fields).map(([key, value]) => ` ${key}=${JSON.stringify(value)}`);
  const target = record.target ? ` ${record.target}:` : "";
  return `${record.level.toUpperCase()}${target} ${record.message}${fields.join("")}`;
}

function describeExit(exit: Exit): string {
  if (exit.error) {
    return `could not run it: ${exit.error.message}`;
  }
  return exit.signal ? `it was killed by ${exit.signal}` : `it exited with code ${exit.code}`;
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A TCP port free on `host` right now, for the binary's API and metrics listeners. */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, host, () => {
      const address = server.address();
      server.close(() =>
        typeof address === "object" && address ? resolve(address.port) : reject(new Error("no free port")),
      );
    });
  });
}
