//! meshctl: the command line for meshd (keys today; peers, exports and diagnostics to come).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use meshd::keys::PrivateKey;
use std::io::{Read, Write};

/// Command-line tool for meshd.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new private key in base64 (as `wg genkey`); redirect it to a file with mode 0600.
    Genkey,
    /// Read a private key on standard input and print its public key (as `wg pubkey`).
    Pubkey,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("meshctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Genkey => {
            let key = PrivateKey::generate();
            writeln!(stdout, "{}", key.to_base64().as_str())?;
        }
        Command::Pubkey => {
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the private key from standard input")?;
            let key = PrivateKey::from_base64("the private key on standard input", &text)?;
            writeln!(stdout, "{}", key.public_key())?;
        }
    }
    Ok(())
}
