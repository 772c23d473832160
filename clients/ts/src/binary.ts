import { accessSync, constants } from "node:fs";
import { createRequire } from "node:module";
import { arch, platform } from "node:process";
import { delimiter, join } from "node:path";

/** The binary's name on PATH and in the platform packages. */
const BINARY_NAME = "remoteingress";

/** The platform packages built, by `${platform}-${arch}`: each holds `bin/remoteingress`. */
const PLATFORM_PACKAGES: Record<string, string> = {
  "linux-x64": "@remoteingress/linux-x64-gnu",
};

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
 * The binary of this platform's package (`@remoteingress/linux-x64-gnu`, installed with this
 * package as an optional dependency), if it is installed.
 */
export function packagedBinary(key = `${platform}-${arch}`): string | undefined {
  const name = PLATFORM_PACKAGES[key];
  if (name === undefined) {
    return undefined;
  }
  try {
    const path = createRequire(import.meta.url).resolve(`${name}/bin/${BINARY_NAME}`);
    return isExecutable(path) ? path : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The `remoteingress` binary to run: `explicit` (the `binaryPath` option) if given, else
 * `$REMOTEINGRESS_BIN`, else the binary of this platform's package, else the first
 * `remoteingress` on `$PATH`. A choice made by the caller wins over the packaged binary.
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
  const packaged = packagedBinary();
  if (packaged !== undefined) {
    return packaged;
  }
  for (const dir of (env.PATH ?? "").split(delimiter).filter(Boolean)) {
    const candidate = join(dir, BINARY_NAME);
    if (isExecutable(candidate)) {
      return candidate;
    }
  }
  const wanted = PLATFORM_PACKAGES[`${platform}-${arch}`];
  const hint =
    wanted === undefined
      ? `no package holds a binary for ${platform}-${arch}; build it (cargo install --path . in the repository)`
      : `reinstall without --no-optional / --omit=optional so that ${wanted} is installed`;
  throw new BinaryNotFoundError(
    `the ${BINARY_NAME} binary was not found: ${hint}, or pass the binaryPath option, set ` +
      `REMOTEINGRESS_BIN, or put ${BINARY_NAME} on PATH`,
  );
}
