/**
 * TypeScript package for remoteingress. {@link RemoteIngressHub} and {@link RemoteIngressEdge}
 * run the `remoteingress` binary as the original package did (start/stop, crash recovery);
 * {@link RemoteIngressHubClient} and {@link RemoteIngressEdgeClient} talk to a hub or edge run
 * elsewhere (systemd, Kubernetes). Also: connection tokens, and the generated messages.
 */
export { RemoteIngressHub } from "./managed-hub.js";
export type { IHubConfig, ManagedHubEvents } from "./managed-hub.js";
export { RemoteIngressEdge } from "./managed-edge.js";
export type { EdgeStartConfig, IEdgeConfig, ManagedEdgeEvents } from "./managed-edge.js";
export type {
  CrashRecovered,
  CrashRecoveryFailed,
  Logger,
  LogLevel,
  LogRecord,
  SupervisorEvents,
  SupervisorOptions,
} from "./supervisor.js";
export { parseLogLine } from "./supervisor.js";
export { BinaryNotFoundError, findBinary, packagedBinary } from "./binary.js";
export { RemoteIngressHubClient } from "./hub.js";
export type { CreatedToken, HubEventBase, HubEvents, RemoteIngressHubClientOptions, TokenOptions } from "./hub.js";
export { RemoteIngressEdgeClient } from "./edge.js";
export type { EdgeEventBase, EdgeEvents } from "./edge.js";
export { transportName } from "./status.js";
export type { ConnectedEdgeInfo, EdgeStatusInfo, HubStatus, TransportName, TunnelInfo } from "./status.js";
export { RemoteIngressError } from "./errors.js";
export type { WatchEvents } from "./client.js";
export { edgeFromProto, edgeToProto } from "./edges.js";
export type {
  EdgeDefinition,
  EdgeState,
  FirewallConfigDefinition,
  FirewallRuleDefinition,
  ProtocolName,
  RateLimitDefinition,
} from "./edges.js";
export { decodeConnectionToken, encodeConnectionToken, MAX_TOKEN_LEN, normalizePin, TokenError } from "./token.js";
export type { ConnectionToken, TokenErrorKind } from "./token.js";
export type { ConnectionOptions } from "./transport.js";
export { Code } from "@connectrpc/connect";
export * from "./gen/remoteingress/v1/config_pb.js";
export * from "./gen/remoteingress/v1/edge_pb.js";
export * from "./gen/remoteingress/v1/hub_pb.js";
