//! `remoteingress-bench`: prints a table of figures next to their direct baseline and writes
//! them as JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use remoteingress_bench::{run, table, BenchConfig};

/// Benchmarks hub and edge processes on loopback against a direct baseline.
#[derive(Parser)]
#[command(name = "remoteingress-bench", version, about)]
struct Args {
    /// The remoteingress binary to measure (build it with `cargo build --release`).
    #[arg(
        long,
        env = "REMOTEINGRESS_BENCH_BINARY",
        default_value = "target/release/remoteingress"
    )]
    binary: PathBuf,
    /// A run of a few seconds that only shows that every measurement works.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results.
    #[arg(
        long,
        env = "REMOTEINGRESS_BENCH_JSON",
        default_value = "bench-results.json"
    )]
    json: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = if args.quick {
        BenchConfig::quick(args.binary)
    } else {
        BenchConfig::full(args.binary)
    };
    let rows = run(&config).await?;
    print!("{}", table(&rows));
    std::fs::write(&args.json, serde_json::to_vec_pretty(&rows)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("results written to {}", args.json.display());
    Ok(())
}
