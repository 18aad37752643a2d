//! The command line: `patchrelay serve`, `check`, `publish`, `cache` and `monitor`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cache::Cache;

mod cache;
mod http;
mod monitor;
use crate::config::Config;
use crate::publish::publish_file;
use cache::CacheCommand;

/// Files at least this large get a progress bar while they are published.
const PROGRESS_THRESHOLD: u64 = 64 * 1024 * 1024;

/// A caching relay for content-addressed software patch bundles.
#[derive(Debug, Parser)]
#[command(name = "patchrelay", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a relay config (keys, units, paths, secrets), or a monitor config, without
    /// starting; exits 2 with `file:line: key: message` lines if anything is wrong.
    Check {
        /// The relay's (or the monitor's) config file.
        #[arg(short, long, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Run a relay until SIGTERM or Ctrl-C.
    Serve {
        /// The relay's config file.
        #[arg(short, long, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Add files to this relay's cache as pinned bundles and print their ids.
    Publish {
        /// The config of the relay whose cache receives the files (normally a root).
        #[arg(short, long, default_value = "relay.toml")]
        config: PathBuf,
        /// Also make these files the manifest of the current patch cycle (root only), so
        /// every relay of the tree pre-stages them.
        #[arg(long)]
        manifest: bool,
        /// With --manifest: when the bundles must be ready at every relay (RFC 3339, e.g.
        /// 2026-12-08T06:00:00Z).
        #[arg(long, requires = "manifest")]
        ready_by: Option<chrono::DateTime<chrono::Utc>>,
        /// Files to publish.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Inspect and manage a relay's cache through its admin API, or offline.
    Cache {
        /// The relay's config file (for its address, admin token or cache directory).
        #[arg(short, long, default_value = "relay.toml")]
        config: PathBuf,
        /// Work directly on the cache directory of a stopped relay.
        #[arg(long)]
        offline: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Run the central monitor (the default), or create deployments and read reports.
    Monitor {
        /// The monitor's config file.
        #[arg(short, long, default_value = "monitor.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: Option<monitor::MonitorCommand>,
    },
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config } => serve(&config),
        Command::Publish {
            config,
            manifest,
            ready_by,
            files,
        } => {
            let manifest = manifest.then_some(ready_by);
            publish(&config, &files, manifest)
        }
        Command::Cache {
            config,
            offline,
            json,
            command,
        } => match load(&config) {
            Ok(config) => cache::run(&config, command, offline, json),
            Err(code) => code,
        },
        Command::Monitor { config, command } => monitor::run(&config, command),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("patchrelay: {e}");
        ExitCode::from(2)
    })
}

/// Loads `path` and runs the preflight checks; prints every problem.
fn load_checked(path: &Path) -> Result<Config, ExitCode> {
    let config = load(path)?;
    let problems = crate::config::preflight(&config);
    for problem in &problems {
        eprintln!("patchrelay: {problem}");
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ExitCode::from(2))
    }
}

/// Whether `path` holds a monitor config: one with the monitor's own sections, or a
/// `[monitor]` table with the monitor's keys (a relay's has only `url` and `spool_max`).
fn is_monitor_config(path: &Path) -> bool {
    let Some(table) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
    else {
        return false;
    };
    let monitor_keys = table
        .get("monitor")
        .and_then(toml::Value::as_table)
        .is_some_and(|m| {
            ["id", "listen", "database"]
                .iter()
                .any(|k| m.contains_key(*k))
        });
    monitor_keys || table.contains_key("checks") || table.contains_key("attribution")
}

fn check(path: &Path) -> ExitCode {
    if is_monitor_config(path) {
        return match crate::monitor::config::MonitorConfig::load(path) {
            Ok(config) => {
                println!(
                    "{}: ok (monitor {}, listen {}, database {})",
                    path.display(),
                    config.id,
                    config.listen,
                    config.database.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("patchrelay: {e}");
                ExitCode::from(2)
            }
        };
    }
    match load_checked(path) {
        Ok(config) => {
            println!(
                "{}: ok (relay {}, site {}, listen {}, {} parent(s){})",
                path.display(),
                config.relay.id,
                config.relay.site,
                config.relay.listen,
                config.upstream.parents.len(),
                if config.upstream.origin.is_some() {
                    ", origin"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(path: &Path) -> ExitCode {
    let config = match load_checked(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("patchrelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(crate::relay::serve(&config));
    // A scrub read in progress on the blocking pool must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "relay failed to start");
            eprintln!("patchrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Publishes `files`; with `manifest` (holding the optional deadline), also makes them the
/// manifest.
fn publish(
    config_path: &Path,
    files: &[PathBuf],
    manifest: Option<Option<chrono::DateTime<chrono::Utc>>>,
) -> ExitCode {
    let config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let cache = match Cache::open(&config.relay.cache_dir) {
        Ok(cache) => cache,
        Err(e) => {
            eprintln!("patchrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    if manifest.is_some() && !config.is_root() {
        eprintln!(
            "patchrelay: --manifest: relay {} has parents; set the manifest at the root",
            config.relay.id
        );
        return ExitCode::from(2);
    }
    if !config.is_root() {
        eprintln!(
            "patchrelay: note: relay {} has parents; bundles published here are pinned at this \
             relay only",
            config.relay.id
        );
    }

    let mut failed = false;
    let mut published_ids = Vec::new();
    for file in files {
        let bar = progress_bar(file);
        let result = publish_file(&cache, file, &mut |n| bar.set_position(n));
        bar.finish_and_clear();
        match result {
            Ok(published) => {
                published_ids.push(published.id);
                let note = if published.already_cached {
                    "  (already cached)"
                } else {
                    ""
                };
                println!(
                    "{}  {}  {}{note}",
                    published.id,
                    published.bytes,
                    file.display()
                );
            }
            Err(e) => {
                eprintln!("patchrelay: {e}");
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::FAILURE;
    }

    if let Some(ready_by) = manifest {
        let entries: Vec<_> = published_ids.into_iter().map(|id| (id, ready_by)).collect();
        match crate::admin::replace_manifest(&cache, &entries) {
            Ok(m) => println!(
                "manifest version {}: {} bundles",
                m.version,
                m.bundles.len()
            ),
            Err(e) => {
                eprintln!("patchrelay: manifest: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// A progress bar on stderr for a large file; hidden for small files or when stderr is
/// not a terminal.
fn progress_bar(file: &Path) -> ProgressBar {
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if len < PROGRESS_THRESHOLD {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(file.display().to_string());
    bar
}
