import { EventEmitter } from "node:events";

import { connect, type Connection, type ConnectionOptions } from "./transport.js";
import { ResubscribingWatch } from "./watch.js";

/** The events every streaming client emits besides its own. */
export interface WatchEvents {
  /** The event stream was lost (e.g. a restart) and is subscribed again; events in between were missed. */
  watchReconnected: [];
  /** The event stream failed or broke; it is retried with backoff by itself. */
  watchError: [Error];
}

/** Events that do not need the stream: failures of the stream itself, and EventEmitter's own. */
const NOT_FROM_THE_STREAM = new Set<string | symbol>(["watchError", "newListener", "removeListener", "error"]);

/**
 * What the hub and edge clients share: one connection, and an event stream of `Message`s that
 * starts with the first listener of a stream event and survives restarts.
 */
export abstract class StreamingClient<
  Events extends Record<keyof Events, unknown[]> & WatchEvents,
  Message,
> extends EventEmitter<Events> {
  protected readonly connection: Connection;
  private watch?: ResubscribingWatch<Message>;

  /** The first listener of any event but `watchError` starts the stream: all others come from it. */
  constructor(options: ConnectionOptions) {
    super();
    this.connection = connect(options);
    (this as EventEmitter).on("newListener", (event: string | symbol) => {
      if (!NOT_FROM_THE_STREAM.has(event)) {
        this.startWatching();
      }
    });
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

  /** Opens the server stream; `onHeader` must see the response headers. */
  protected abstract subscribe(signal: AbortSignal, onHeader: (headers: Headers) => void): AsyncIterable<Message>;

  /** Emits the event a message carries. */
  protected abstract dispatch(message: Message): void;

  private startWatching(): ResubscribingWatch<Message> {
    if (!this.watch) {
      const emitter = this as EventEmitter;
      this.watch = new ResubscribingWatch<Message>({
        subscribe: (signal, onHeader) => this.subscribe(signal, onHeader),
        onMessage: (message) => this.dispatch(message),
        onReconnected: () => emitter.emit("watchReconnected"),
        onError: (error) => emitter.emit("watchError", error instanceof Error ? error : new Error(String(error))),
      });
    }
    return this.watch;
  }
}
