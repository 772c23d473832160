import assert from "node:assert/strict";
import { test } from "node:test";

import { parseLogLine } from "../src/index.js";

test("a JSON log line becomes a record with its level, message, fields, target and time", () => {
  const record = parseLogLine(
    '{"timestamp":"2026-12-06T02:13:25.067200Z","level":"WARN","fields":{"message":"cannot reach the hub",' +
      '"hub":"localhost:8443","error":"refused"},"target":"remoteingress_edge::slots"}',
  );
  assert.deepEqual(record, {
    level: "warn",
    message: "cannot reach the hub",
    fields: { hub: "localhost:8443", error: "refused" },
    target: "remoteingress_edge::slots",
    time: new Date("2026-12-06T02:13:25.067200Z"),
  });
});

test("a line printed for people is an info record of its own text", () => {
  const record = parseLogLine("certificate pin (sha256): ab12");
  assert.equal(record.level, "info");
  assert.equal(record.message, "certificate pin (sha256): ab12");
  assert.deepEqual(record.fields, {});
  assert.equal(record.target, "");
});

test("odd JSON lines still give a record", () => {
  assert.equal(parseLogLine('{"level":"LOUD","fields":{"message":1}}').level, "info");
  assert.equal(parseLogLine('{"level":"ERROR","fields":{"message":1}}').message, "1");
  assert.equal(parseLogLine("[1, 2]").message, "[1, 2]");
  assert.equal(parseLogLine('{"level":"DEBUG","timestamp":"not a time"}').time instanceof Date, true);
});
