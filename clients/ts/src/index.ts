/**
 * TypeScript client for remoteingress: the hub admin API ({@link RemoteIngressHub}), an edge's
 * status API ({@link RemoteIngressEdgeStatus}), connection tokens, and the generated messages.
 */
export { RemoteIngressHub } from "./hub.js";
export type { CreatedToken, HubEventBase, HubEvents, RemoteIngressHubOptions } from "./hub.js";
export { RemoteIngressEdgeStatus } from "./edge.js";
export type { EdgeEventBase, EdgeEvents } from "./edge.js";
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
