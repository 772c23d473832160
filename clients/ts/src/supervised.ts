import { EventEmitter } from "node:events";

import { Supervisor, type Launch, type SupervisorOptions } from "./supervisor.js";

/**
 * What {@link RemoteIngressHub} and {@link RemoteIngressEdge} share: the supervised binary, its
 * state, and the client of the running process.
 */
export abstract class SupervisedBinary<
  C extends { close(): Promise<void> },
  Events extends Record<keyof Events, unknown[]>,
> extends EventEmitter<Events> {
  protected readonly supervisor: Supervisor<C>;

  constructor(
    options: SupervisorOptions,
    private readonly what: string,
  ) {
    super();
    this.supervisor = new Supervisor<C>(
      {
        prepare: () => this.prepare(),
        probe: (client) => this.probe(client),
        ready: (client, restart) => this.attach(client, restart),
        emit: (event, ...args) => (this as EventEmitter).emit(event, ...args),
      },
      options,
    );
  }

  /** Whether the binary is alive. */
  get running(): boolean {
    return this.supervisor.running;
  }

  /** The binary's process id while it runs. */
  get pid(): number | undefined {
    return this.supervisor.pid;
  }

  /** The API client of the running binary, for the rest of its API; throws if not running. */
  get client(): C {
    const client = this.supervisor.current;
    if (!client) {
      throw new Error(`the ${this.what} is not running`);
    }
    return client;
  }

  /** Throws unless the binary is stopped: a second `start()` must not change the running one. */
  protected assertStopped(): void {
    if (this.supervisor.started) {
      throw new Error(`the ${this.what} is already started`);
    }
  }

  /** Stops the binary gracefully (SIGTERM, then its grace period). Harmless when not running. */
  async stop(): Promise<void> {
    await this.supervisor.stop();
  }

  /** Arguments for a new process (with fresh free ports) and a client for it. */
  protected abstract prepare(): Promise<Launch<C>>;

  /** Resolves once the process answers through `client`. */
  protected abstract probe(client: C): Promise<void>;

  /** Attaches event forwarding once the process answers, and re-applies state after a restart. */
  protected abstract attach(client: C, restart: boolean): Promise<void>;
}
