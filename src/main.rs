//! redtail: follows log files and publishes every line, parsed, to Redis streams, exactly
//! once. See README.md for use and docs/ for the design.

mod cmd;
mod config;
mod deadletter;
mod follow;
mod pipeline;
mod publish;
mod record;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default config path, as installed by the Debian package.
pub const DEFAULT_CONFIG: &str = "/etc/redtail/redtail.toml";

#[derive(Parser)]
#[command(
    name = "redtail",
    version,
    about = "Tails log files into Redis streams, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow every configured file and publish new lines until stopped (SIGTERM/SIGINT).
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Publish every matching file from its checkpoint (or start) to its end, then exit.
    Backfill {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Never draw a progress bar (it is drawn only on a terminal anyway).
        #[arg(long)]
        no_progress: bool,
        /// Read, cut and parse every matching file from its start, print what would be
        /// published and how fast; write nothing (no Redis, no checkpoints, no dead letters).
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the checkpoint of every file (works while `run` holds the store).
    Checkpoints {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file; reports every problem with file, line and key.
    Validate {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Parse lines from a file or stdin and print one JSON object per record.
    Parse {
        /// raw, json, logfmt, syslog, nginx, nginx_error, apache, iptables, regex
        #[arg(long)]
        parser: String,
        /// The pattern, for --parser regex (named groups become fields).
        #[arg(long)]
        pattern: Option<String>,
        /// Input file (default: stdin).
        file: Option<PathBuf>,
    },
    /// Inspect and replay the dead-letter file.
    Dlq {
        #[arg(short, long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Recover from a corrupt or unreadable checkpoint store.
    State {
        #[arg(short, long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: StateAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Counts by source, class and error.
    Stats,
    /// Print dead-lettered records.
    Show {
        #[arg(long)]
        source: Option<String>,
        /// parse, oversize, encoding or rejected
        #[arg(long)]
        class: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the stored JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Re-parse records with the current config; publish those that parse now (exactly
    /// once, also across interrupted replays) and keep the rest.
    Replay {
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Move the store aside (never deleted) and start a fresh one.
    Recover {
        /// Seed the fresh store from the last exported snapshot (checkpoints.json).
        #[arg(long)]
        from_snapshot: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => cmd::run(&config),
        Command::Backfill {
            config,
            source,
            no_progress,
            dry_run,
        } => cmd::backfill(&config, source.as_deref(), no_progress, dry_run),
        Command::Checkpoints { config, json } => cmd::checkpoints(&config, json),
        Command::Validate { config } => cmd::validate(&config),
        Command::Parse {
            parser,
            pattern,
            file,
        } => cmd::parse(&parser, pattern.as_deref(), file.as_deref()),
        Command::Dlq { config, action } => match action {
            DlqAction::Stats => cmd::dlq_stats(&config),
            DlqAction::Show {
                source,
                class,
                limit,
                json,
            } => cmd::dlq_show(&config, source.as_deref(), class.as_deref(), limit, json),
            DlqAction::Replay { source } => cmd::dlq_replay(&config, source.as_deref()),
        },
        Command::State { config, action } => match action {
            StateAction::Recover { from_snapshot } => cmd::state_recover(&config, from_snapshot),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`redtail parse … | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            if e.downcast_ref::<config::ConfigErrors>().is_some() {
                eprintln!("redtail: {e}");
                return ExitCode::from(2);
            }
            eprintln!("redtail: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
