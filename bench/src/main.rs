//! `remoteingress-bench`: prints a table of figures next to their direct baseline and writes
//! them as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use remoteingress_bench::targets::{self, Mode};
use remoteingress_bench::{relay, run, table, BenchConfig, Section};

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
    #[arg(long, env = "REMOTEINGRESS_BENCH_QUICK")]
    quick: bool,
    /// Only these measurements (comma-separated); all of them when not given.
    #[arg(long, env = "REMOTEINGRESS_BENCH_ONLY", value_delimiter = ',')]
    only: Vec<Section>,
    /// Where to write the JSON results.
    #[arg(
        long,
        env = "REMOTEINGRESS_BENCH_JSON",
        default_value = "bench-results.json"
    )]
    json: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Helper processes the bench starts itself; each prints the port it listens on.
#[derive(Subcommand)]
enum Command {
    /// A plain TCP relay, for the latency floor.
    #[command(hide = true)]
    Relay {
        /// Where to relay connections to.
        #[arg(long)]
        target: SocketAddr,
    },
    /// An echo target in a process of its own, for the idle connections.
    #[command(hide = true)]
    Echo,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Relay { target }) => return relay::serve(target),
        Some(Command::Echo) => return serve_echo(),
        None => {}
    }
    let mut config = if args.quick {
        BenchConfig::quick(args.binary)
    } else {
        BenchConfig::full(args.binary)
    };
    config.helpers = Some(std::env::current_exe().context("finding the bench binary")?);
    if !args.only.is_empty() {
        config.sections = args.only.into_iter().collect();
    }
    if config.sections.contains(&Section::Loss) {
        remoteingress_bench::loss::enter_private_network()?;
    }
    let rows = tokio::runtime::Runtime::new()?.block_on(run(&config))?;
    print!("{}", table(&rows));
    std::fs::write(&args.json, serde_json::to_vec_pretty(&rows)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("results written to {}", args.json.display());
    Ok(())
}

/// Runs an echo target until killed, after printing its port.
fn serve_echo() -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let echo = targets::start(Mode::Echo).await?;
        println!("{}", echo.addr.port());
        std::future::pending::<()>().await;
        Ok(())
    })
}
