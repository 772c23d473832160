import assert from "node:assert/strict";
import { test } from "node:test";

import { decodeConnectionToken, encodeConnectionToken, TokenError, type ConnectionToken } from "../src/index.js";
import { VECTORS } from "./harness.js";

interface Case {
  name: string;
  fields: ConnectionToken;
  token: string;
  error?: string;
}

test("tokens encode to exactly the shared vectors and decode back", () => {
  for (const { name, fields, token } of VECTORS.tokens as Case[]) {
    assert.equal(encodeConnectionToken(fields), token, name);
    assert.deepEqual(decodeConnectionToken(token), fields, name);
  }
});

test("lenient forms decode like the Rust CLI decodes them", () => {
  for (const { name, fields, token } of VECTORS.decodeOnly as Case[]) {
    assert.deepEqual(decodeConnectionToken(token), fields, name);
  }
});

test("invalid tokens throw a TokenError of the shared kind", () => {
  for (const { name, token, error } of VECTORS.invalidTokens as Case[]) {
    assert.throws(
      () => decodeConnectionToken(token),
      (thrown) => thrown instanceof TokenError && thrown.kind === error,
      name,
    );
  }
});

test("a bad pin is refused when encoding", () => {
  assert.throws(
    () => encodeConnectionToken({ hubHost: "h", hubPort: 1, edgeId: "e", secret: "s", pin: "xyz" }),
    (thrown) => thrown instanceof TokenError && thrown.kind === "badPin",
  );
});
