import { Code, ConnectError } from "@connectrpc/connect";

/**
 * A call the hub (or edge) refused, or that failed on the way: the gRPC code, the message, and
 * for validation errors the edge and field at fault.
 */
export class RemoteIngressError extends Error {
  /** gRPC status code: `Code.InvalidArgument` for a rejected edge, `Code.Unauthenticated` for a wrong token, `Code.Unavailable` when unreachable. */
  readonly code: Code;
  /** The edge a validation error is about. */
  readonly edgeId?: string;
  /** The first field a validation error names, e.g. `firewallConfig.rateLimits[0].rate`. */
  readonly field?: string;

  constructor(code: Code, message: string, cause?: unknown) {
    super(message, { cause });
    this.name = "RemoteIngressError";
    this.code = code;
    // The hub words validation errors as `edge "<id>": <field>: <problem>[; ...]`.
    const invalid = /^edge "([^"]*)": ([^:;]+):/.exec(message);
    if (invalid) {
      this.edgeId = invalid[1];
      this.field = invalid[2];
    }
  }

  /** The error for anything a call threw. */
  static from(error: unknown): RemoteIngressError {
    if (error instanceof RemoteIngressError) {
      return error;
    }
    const connect = ConnectError.from(error);
    return new RemoteIngressError(connect.code, connect.rawMessage, error);
  }
}

/** Runs a call, turning whatever it throws into a RemoteIngressError. */
export async function call<T>(run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (error) {
    throw RemoteIngressError.from(error);
  }
}
