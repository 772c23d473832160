import { accessSync, constants } from "node:fs";
import { delimiter, join } from "node:path";

/** The binary's name on PATH. */
const BINARY_NAME = "remoteingress";

/** Thrown when the `remoteingress` binary cannot be found. */
export class BinaryNotFoundError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BinaryNotFoundError";
  }
}

function isExecutable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The `remoteingress` binary to run: `explicit` (the `binaryPath` option) if given, else
 * `$REMOTEINGRESS_BIN`, else the first `remoteingress` on `$PATH`.
 */
export function findBinary(explicit?: string, env: NodeJS.ProcessEnv = process.env): string {
  const named = explicit ?? env.REMOTEINGRESS_BIN;
  if (named !== undefined && named !== "") {
    if (isExecutable(named)) {
      return named;
    }
    const source = explicit !== undefined ? "the binaryPath option" : "REMOTEINGRESS_BIN";
    throw new BinaryNotFoundError(`${source} names ${named}, which is not an executable file`);
  }
  for (const dir of (env.PATH ?? "").split(delimiter).filter(Boolean)) {
    const candidate = join(dir, BINARY_NAME);
    if (isExecutable(candidate)) {
      return candidate;
    }
  }
  throw new BinaryNotFoundError(
    `the ${BINARY_NAME} binary was not found: pass the binaryPath option, set REMOTEINGRESS_BIN, ` +
      `or put ${BINARY_NAME} on PATH (cargo install --path . in the repository, or a release download)`,
  );
}
