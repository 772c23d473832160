/** Backoff between resubscriptions, doubling from the first to the second value. */
const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5_000;

/** What a resubscribing watch needs from its owner. */
export interface WatchHandlers<T> {
  /** Opens the server stream; must call `onHeader` when the response headers arrive. */
  subscribe(signal: AbortSignal, onHeader: (headers: Headers) => void): AsyncIterable<T>;
  /** Each message received. */
  onMessage(message: T): void;
  /** A subscription is up again after the stream was lost (events in between were missed). */
  onReconnected(): void;
  /** A subscription failed or broke; the watch retries by itself. */
  onError(error: unknown): void;
}

/**
 * A server stream that is resubscribed with backoff whenever it breaks (for example across a hub
 * restart), until `stop()` is called.
 */
export class ResubscribingWatch<T> {
  private readonly abort = new AbortController();
  private readonly done: Promise<void>;
  private markSubscribed!: () => void;
  /** Resolves once the first subscription is up: events from then on are delivered. */
  readonly subscribed = new Promise<void>((resolve) => (this.markSubscribed = resolve));

  constructor(handlers: WatchHandlers<T>) {
    this.done = this.run(handlers);
  }

  /** Ends the watch; resolves once its loop has finished. */
  async stop(): Promise<void> {
    this.abort.abort();
    await this.done;
  }

  private async run(handlers: WatchHandlers<T>): Promise<void> {
    const signal = this.abort.signal;
    let retryMs = RETRY_MIN_MS;
    let lost = false;
    while (!signal.aborted) {
      try {
        const onHeader = (headers: Headers) => {
          if (headers.has("grpc-status")) {
            return; // a trailers-only answer: refused, not subscribed (the error follows)
          }
          this.markSubscribed();
          if (lost) {
            lost = false;
            handlers.onReconnected();
          }
        };
        for await (const message of handlers.subscribe(signal, onHeader)) {
          retryMs = RETRY_MIN_MS;
          handlers.onMessage(message);
        }
      } catch (error) {
        if (signal.aborted) {
          return;
        }
        handlers.onError(error);
      }
      lost = true;
      await sleep(retryMs, signal);
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    }
  }
}

/** Resolves after `ms`, or at once when `signal` is (or becomes) aborted. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve();
      return;
    }
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}
