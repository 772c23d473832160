//! `remoteingress`: the command line. It parses arguments and wires the library crates together.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use remoteingress_wire::token::{normalize_pin, ConnectionToken};

/// Edge ingress tunnel: an edge on a public machine carries TCP and UDP over one TLS or QUIC
/// tunnel to a hub in a private network, which hands each connection to a local reverse proxy
/// with a PROXY protocol header.
#[derive(Parser)]
#[command(name = "remoteingress", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: accept edge tunnels and forward their connections to targets.
    Hub,
    /// Run an edge: connect to the hub and listen on the ports it assigns.
    Edge,
    /// Create or inspect connection tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a hub, an edge and a sample target on loopback and show a request going through.
    Demo,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print the token for an edge.
    Encode(EncodeArgs),
    /// Print a token's contents as JSON.
    Decode {
        /// The token.
        #[arg(env = "REMOTEINGRESS_TOKEN")]
        token: String,
    },
}

#[derive(Args)]
struct EncodeArgs {
    /// Host name or address edges use to reach the hub.
    #[arg(long, env = "REMOTEINGRESS_HUB_HOST")]
    hub_host: String,
    /// Tunnel port of the hub.
    #[arg(long, env = "REMOTEINGRESS_HUB_PORT", default_value_t = 8443)]
    hub_port: u16,
    /// Edge id ([A-Za-z0-9._-], 1-128 characters).
    #[arg(long, env = "REMOTEINGRESS_EDGE_ID")]
    edge_id: String,
    /// Edge secret.
    #[arg(long, env = "REMOTEINGRESS_SECRET", hide_env_values = true)]
    secret: String,
    /// SHA-256 pin of the hub certificate (64 hex digits), printed by `remoteingress hub`.
    #[arg(long, env = "REMOTEINGRESS_HUB_PIN")]
    pin: Option<String>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Token(TokenCommand::Encode(args)) => {
            remoteingress_wire::handshake::EdgeHello::new(&args.edge_id, &args.secret)
                .context("invalid edge credentials")?;
            let token = ConnectionToken {
                hub_host: args.hub_host,
                hub_port: args.hub_port,
                edge_id: args.edge_id,
                secret: args.secret,
                pin: args.pin.as_deref().map(normalize_pin).transpose()?,
            };
            println!("{}", token.encode());
        }
        Command::Token(TokenCommand::Decode { token }) => {
            let token = ConnectionToken::decode(&token)?;
            println!("{}", serde_json::to_string_pretty(&token_json(&token))?);
        }
        Command::Hub | Command::Edge | Command::Demo => {
            bail!("this command is not implemented yet")
        }
    }
    Ok(())
}

/// The token's contents with readable key names.
fn token_json(token: &ConnectionToken) -> serde_json::Value {
    serde_json::json!({
        "hubHost": token.hub_host,
        "hubPort": token.hub_port,
        "edgeId": token.edge_id,
        "secret": token.secret,
        "pin": token.pin,
    })
}
