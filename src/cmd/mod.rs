//! One function per subcommand: thin layers over the pipeline, the store and the
//! dead-letter file.

mod dlq;
mod inspect;

pub use dlq::{dlq_replay, dlq_show, dlq_stats};
pub use inspect::{checkpoints, parse, state_recover, validate};

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redtail_state::{CheckpointStore, StateError};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::pipeline::{self, Control, Mode};
use crate::stats::STATS;

/// Logs go to stderr; `RUST_LOG` wins over `agent.log_level`.
pub fn init_tracing(level: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| level.map(str::to_string))
        .unwrap_or_else(|| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Opens the checkpoint store, turning sled's failures into instructions.
/// The snapshot is exported once at open: a crash between a commit and its export leaves it
/// behind the store, and `redtail checkpoints` (which reads it while the agent runs) would
/// show stale offsets until the next commit, which may never come for quiet files.
pub fn open_store(cfg: &Config) -> anyhow::Result<CheckpointStore> {
    let store =
        CheckpointStore::open(&cfg.agent.state_dir).map_err(|e| explain_store_error(cfg, e))?;
    if let Err(e) = store.export_snapshot() {
        tracing::warn!(error = %e, "cannot export the checkpoint snapshot; `redtail checkpoints` may show older offsets until the next commit");
    }
    Ok(store)
}

/// A store error with what to do about it.
pub fn explain_store_error(cfg: &Config, e: StateError) -> anyhow::Error {
    match e {
        e @ StateError::Locked { .. } => anyhow::anyhow!(
            "{e}\n  Another redtail process is using agent.state_dir = {}. Stop it first (`systemctl stop redtail`), or give this run its own state_dir.",
            cfg.agent.state_dir.display()
        ),
        e @ StateError::Corrupt { .. } => anyhow::anyhow!(
            "{e}\n  The checkpoint store cannot be read; redtail did not start. To recover (the damaged store is moved aside, never deleted):\n    redtail state recover -c {} --from-snapshot   # rebuild from the last exported checkpoints.json\n    redtail state recover -c {}                   # start with no checkpoints\n  Either way the Redis-side high-water marks stop lines already in Redis from being published twice (docs/checkpoints.md).",
            cfg.path.display(),
            cfg.path.display()
        ),
        e => anyhow::Error::new(e).context(format!(
            "opening the checkpoint store in {}",
            cfg.agent.state_dir.display()
        )),
    }
}

fn log_stats(prefix: &str) {
    let s: Vec<String> = STATS
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info!("{prefix}: {}", s.join(" "));
}

/// `redtail run`.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    init_tracing(cfg.agent.log_level.as_deref());
    for w in cfg.warnings() {
        warn!("{w}");
    }
    let store = Arc::new(open_store(&cfg)?);
    info!(
        config = %path.display(),
        sources = cfg.sources.len(),
        redis = %redact(&cfg.redis.url),
        state_dir = %cfg.agent.state_dir.display(),
        "redtail {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let timeout = cfg.agent.shutdown_timeout;
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel::<Control>();
    // Signals: the first stops reading (drain, publish, commit); after shutdown_timeout, or
    // at a second signal, publishing is abandoned — unpublished lines are simply not
    // checkpointed, so the next start reads them again.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(mut ctl) = ctl_rx.recv() else { return };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot start the signal handler");
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) =
                    (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
                else {
                    error!("cannot install signal handlers");
                    return;
                };
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                info!(timeout = ?timeout, "stopping: publishing what was read, then committing");
                ctl.stop_reading.take();
                tokio::select! {
                    _ = term.recv() => warn!("second signal: stopping now"),
                    _ = int.recv() => warn!("second signal: stopping now"),
                    _ = tokio::time::sleep(timeout) => warn!("agent.shutdown_timeout reached: stopping with lines unpublished (they are not checkpointed and will be read again)"),
                    // The publisher holds the pipeline until the dead-letter file can be
                    // written; waiting for that would only wait out the timeout.
                    _ = async {
                        while !crate::deadletter::stalled() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    } => warn!("the dead-letter file cannot be written (see the ERROR above): stopping now with lines unpublished (they are not checkpointed and will be read again)"),
                    _ = ctl.abort.closed() => return,
                }
                let _ = ctl.abort.send(true);
            });
        })?;
    let stats_every = Duration::from_secs(60);
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || loop {
            std::thread::sleep(stats_every);
            log_stats("counters");
        })?;
    let summary = pipeline::run(
        &cfg,
        Mode::Follow,
        None,
        Some(store.clone()),
        |c| {
            let _ = ctl_tx.send(c);
        },
        None,
    )?;
    store.flush().context("final checkpoint flush")?;
    store.export_snapshot().context("final snapshot export")?;
    log_stats("stopped");
    if summary.aborted {
        warn!("stopped before everything read was published; the rest is read again at the next start");
    }
    Ok(ExitCode::SUCCESS)
}

/// `redtail backfill`.
pub fn backfill(
    path: &Path,
    source: Option<&str>,
    no_progress: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    init_tracing(Some(cfg.agent.log_level.as_deref().unwrap_or("warn")));
    if let Some(s) = source {
        cfg.source(s)?;
    }
    // A dry run touches nothing in state_dir (it works while the agent runs).
    let store = if dry_run {
        None
    } else {
        Some(Arc::new(open_store(&cfg)?))
    };
    let pb = if !no_progress && std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel::<Control>();
    std::thread::spawn(move || {
        // Ctrl-C during a backfill: stop reading, publish and commit what was read.
        let Ok(mut ctl) = ctl_rx.recv() else { return };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}, _ = int.recv() => {},
                _ = ctl.abort.closed() => return,
            }
            ctl.stop_reading.take();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {}, _ = ctl.abort.closed() => return }
            let _ = ctl.abort.send(true);
        });
    });
    let summary = pipeline::run(
        &cfg,
        if dry_run {
            Mode::DryRun
        } else {
            Mode::Backfill
        },
        source,
        store.clone(),
        |c| {
            let _ = ctl_tx.send(c);
        },
        pb.clone(),
    )?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let get = |c: &std::sync::atomic::AtomicU64| crate::stats::get(c);
    let Some(store) = store else {
        print_rate("dry run", &summary);
        println!(
            "  would publish {} entries, dead-letter {}, drop {} (by filter); nothing was written",
            summary.would_publish,
            summary.would_dead_letter,
            get(&STATS.dropped_by_filter)
        );
        println!(
            "  reading and cutting lines took {:.2} CPU-s in the follower thread: {:.0} MB/s",
            summary.follower_cpu,
            summary.bytes as f64 / summary.follower_cpu.max(1e-9) / 1e6
        );
        return Ok(ExitCode::SUCCESS);
    };
    store.flush()?;
    store.export_snapshot()?;
    print_rate("backfill", &summary);
    println!(
        "  published {} entries ({} already in Redis), dead-lettered {}, dropped by filter {}",
        get(&STATS.entries_published),
        get(&STATS.entries_skipped),
        get(&STATS.dead_lettered),
        get(&STATS.dropped_by_filter)
    );
    if summary.held_back_bytes > 0 {
        println!(
            "  held back {} bytes in {} file(s): last lines without a newline yet (published once complete)",
            summary.held_back_bytes, summary.held_back_files
        );
    }
    if get(&STATS.lost_bytes) > 0 {
        println!("  LOST {} bytes (see the log)", get(&STATS.lost_bytes));
    }
    if summary.aborted {
        println!("  interrupted: the rest is published by the next run");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

/// The summary's first line: files, lines, bytes, seconds, lines/s, MB/s.
fn print_rate(what: &str, s: &pipeline::Summary) {
    let secs = s.seconds.max(1e-9);
    println!(
        "{what}: {} files, {} lines, {} bytes in {:.2} s: {:.0} lines/s, {:.1} MB/s",
        s.files,
        s.lines,
        s.bytes,
        secs,
        s.lines as f64 / secs,
        s.bytes as f64 / secs / 1e6
    );
}

/// A Redis URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
