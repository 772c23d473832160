/**
 * Connection tokens: everything an edge needs to reach its hub in one copy-pasteable string,
 * byte-for-byte the tokens of the Rust CLI (`remoteingress token encode`).
 *
 * A token is base64url (no padding) of the compact JSON
 * `{"h":host,"p":port,"e":edgeId,"s":secret}` plus, optionally, `"f"`: the hub certificate's
 * SHA-256 pin in lowercase hex, and `"hubs"`: further hub addresses of the same tier.
 */

/** The contents of a connection token. */
export interface ConnectionToken {
  /** Hub host name or address. */
  hubHost: string;
  /** Hub tunnel port. */
  hubPort: number;
  /** Edge id. */
  edgeId: string;
  /** Edge secret. */
  secret: string;
  /** SHA-256 of the hub's certificate, lowercase hex; absent for none. */
  pin?: string;
  /** Further hubs of the same tier, `host:port`, besides hubHost:hubPort; absent for none. */
  hubs?: string[];
}

/** The longest token accepted. */
export const MAX_TOKEN_LEN = 16 * 1024;

/** Why a token could not be decoded (the same kinds as the Rust `TokenError`). */
export type TokenErrorKind = "tooLong" | "base64" | "json" | "badPin";

/** A token that could not be encoded or decoded. */
export class TokenError extends Error {
  /** What was wrong. */
  readonly kind: TokenErrorKind;

  constructor(kind: TokenErrorKind, message: string) {
    super(message);
    this.name = "TokenError";
    this.kind = kind;
  }
}

/** Checks that `pin` is a SHA-256 in hex (colons allowed) and returns it in lowercase. */
export function normalizePin(pin: string): string {
  const digits = pin.replaceAll(":", "");
  if (!/^[0-9a-fA-F]{64}$/.test(digits)) {
    throw new TokenError("badPin", "token pin must be 64 hex digits (SHA-256)");
  }
  return digits.toLowerCase();
}

/** The token string for `token`; a pin that is not a SHA-256 throws a TokenError. */
export function encodeConnectionToken(token: ConnectionToken): string {
  if (!Number.isInteger(token.hubPort) || token.hubPort < 0 || token.hubPort > 65535) {
    throw new RangeError(`hubPort ${token.hubPort} is not a port`);
  }
  const fields: Record<string, string | number | string[]> = {
    h: token.hubHost,
    p: token.hubPort,
    e: token.edgeId,
    s: token.secret,
  };
  if (token.pin !== undefined && token.pin !== "") {
    fields.f = normalizePin(token.pin);
  }
  if (token.hubs !== undefined && token.hubs.length > 0) {
    fields.hubs = token.hubs;
  }
  return Buffer.from(JSON.stringify(fields), "utf8").toString("base64url");
}

const BASE64URL = /^[A-Za-z0-9_-]*$/;

/** Base64url, strictly: the alphabet, canonical padding if any, no stray trailing bits. */
function decodeBase64Url(text: string): Uint8Array {
  const padded = text.endsWith("=");
  const body = padded ? text.replace(/=+$/, "") : text;
  if (!BASE64URL.test(body) || body.length % 4 === 1) {
    throw new TokenError("base64", "token is not base64url");
  }
  const bytes = Buffer.from(body, "base64url");
  const canonical = bytes.toString("base64url");
  const expected = padded ? canonical + "=".repeat((4 - (canonical.length % 4)) % 4) : canonical;
  if (expected !== text) {
    throw new TokenError("base64", "token is not canonical base64url");
  }
  return bytes;
}

function field(json: Record<string, unknown>, key: string, type: "string" | "port"): string | number {
  const value = json[key];
  if (type === "string" && typeof value === "string") {
    return value;
  }
  if (type === "port" && Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 65535) {
    return value as number;
  }
  throw new TokenError("json", `token does not hold connection details: field "${key}" is missing or not a ${type}`);
}

/**
 * Decodes a token; surrounding whitespace and base64 padding are tolerated and the pin comes
 * back in lowercase. Throws a TokenError whose `kind` says what was wrong.
 */
export function decodeConnectionToken(token: string): ConnectionToken {
  const text = token.trim();
  if (Buffer.byteLength(text, "utf8") > MAX_TOKEN_LEN) {
    throw new TokenError("tooLong", `token is longer than ${MAX_TOKEN_LEN} characters`);
  }
  const bytes = decodeBase64Url(text);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new TokenError("json", `token does not hold connection details: ${String(error)}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new TokenError("json", "token does not hold connection details: not a JSON object");
  }
  const fields = json as Record<string, unknown>;
  const decoded: ConnectionToken = {
    hubHost: field(fields, "h", "string") as string,
    hubPort: field(fields, "p", "port") as number,
    edgeId: field(fields, "e", "string") as string,
    secret: field(fields, "s", "string") as string,
  };
  if (fields.f !== undefined && fields.f !== null) {
    if (typeof fields.f !== "string") {
      throw new TokenError("json", 'token does not hold connection details: field "f" is not a string');
    }
    decoded.pin = normalizePin(fields.f);
  }
  if (fields.hubs !== undefined && fields.hubs !== null) {
    if (!Array.isArray(fields.hubs) || !fields.hubs.every((hub) => typeof hub === "string")) {
      throw new TokenError("json", 'token does not hold connection details: field "hubs" is not a list of strings');
    }
    decoded.hubs = fields.hubs as string[];
  }
  return decoded;
}
