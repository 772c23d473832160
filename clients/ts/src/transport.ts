import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { SecureClientSessionOptions } from "node:http2";

/** How to reach a remoteingress gRPC endpoint. */
export interface ConnectionOptions {
  /** `host:port` (plaintext, the loopback default) or a URL: `http://host:port`, `https://host:port`. */
  address: string;
  /** Admin token, sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** TLS options (CA, client certificate, ...) for an `https://` address. */
  tls?: SecureClientSessionOptions;
}

/** A gRPC transport over one HTTP/2 connection, and the means to close that connection. */
export interface Connection {
  /** The transport clients are created on. */
  transport: Transport;
  /** Closes the connection and every call on it. */
  close(): void;
}

/** Opens a connection as `options` say (lazily: nothing is dialled before the first call). */
export function connect(options: ConnectionOptions): Connection {
  const baseUrl = /^https?:\/\//.test(options.address) ? options.address : `http://${options.address}`;
  const sessionManager = new Http2SessionManager(baseUrl, { pingIntervalMs: 15_000 }, options.tls ?? {});
  const interceptors: Interceptor[] = [];
  const token = options.token;
  if (token !== undefined && token !== "") {
    interceptors.push((next) => (request) => {
      request.header.set("authorization", `Bearer ${token}`);
      return next(request);
    });
  }
  const transport = createGrpcTransport({ baseUrl, sessionManager, interceptors });
  return { transport, close: () => sessionManager.abort() };
}
