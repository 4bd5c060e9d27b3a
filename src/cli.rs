//! The command line: arguments, set-up, and what each command prints.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};

use crate::core::provisioning::Provisioning;
use crate::db::repo::{provisioning, status};
use crate::db::url::DEFAULT_URL;
use crate::db::{migrate, Database, DatabaseUrl, Failure, PoolSettings, RetryPolicy};
use crate::pipeline::{self, IngestOptions, Progress, Stopped, Summary};

/// Exit code of a run that gave up on an unreachable database.
pub const EXIT_GAVE_UP: u8 = 3;

/// Turns raw sensor messages into readings and alerts.
#[derive(Debug, Parser)]
#[command(name = "normalizer", version, about)]
pub struct Cli {
    /// Database URL: postgres://…, postgresql://…, sqlite://PATH or a bare path.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_URL, global = true, hide_env_values = true)]
    pub database_url: String,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,

    /// Give up after the database was unreachable this long (e.g. 300s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration, global = true)]
    pub max_outage: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the database migrations and nothing else.
    Migrate,
    /// Load a provisioning file (profiles, devices, sensors, alarms).
    Provision {
        /// The provisioning JSON file.
        file: PathBuf,
        /// Print what was loaded as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Normalize a stream of JSON-lines messages.
    Ingest {
        /// The input file; standard input when absent or `-`.
        file: Option<PathBuf>,
        /// Load this provisioning file first.
        #[arg(long)]
        provision: Option<PathBuf>,
        /// Worker threads (default: the number of CPUs).
        #[arg(long)]
        workers: Option<usize>,
        /// Print the final summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Generate a provisioning file and a message stream for benchmarks.
    Gen {
        /// Devices to provision.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Lines to write.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// Random seed: the same seed gives the same output.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the provisioning file here.
        #[arg(long)]
        provisioning: Option<PathBuf>,
        /// Write the messages here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Counts from the database.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `500ms`, `30s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// What `main` turns into an exit code.
#[derive(Debug)]
pub enum RunError {
    /// Usage, set-up or database errors: exit 1.
    Failed(anyhow::Error),
    /// The database stayed unreachable: exit [`EXIT_GAVE_UP`].
    GaveUp(anyhow::Error),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), RunError> {
    let url = DatabaseUrl::parse(&cli.database_url).map_err(|e| RunError::Failed(anyhow!(e)))?;
    let policy = RetryPolicy {
        max_outage: cli.max_outage,
        ..RetryPolicy::default()
    };
    match cli.command {
        Command::Migrate => {
            let db = open(url, 1, policy);
            let applied = migrate::run(&db).map_err(db_error)?;
            println!("{} migrations applied to {}", applied.len(), db.url());
            Ok(())
        }
        Command::Provision { file, json } => {
            let provisioning = read_provisioning(&file).map_err(RunError::Failed)?;
            let db = open(url, 1, policy);
            migrate::run(&db).map_err(db_error)?;
            let loaded = load_provisioning(&db, &provisioning, &file)?;
            if json {
                println!("{}", serde_json::to_string(&loaded).expect("serializable"));
            } else {
                println!(
                    "provisioned {} profiles, {} devices, {} sensors, {} alarms from {}",
                    loaded.profiles,
                    loaded.devices,
                    loaded.sensors,
                    loaded.alarms,
                    file.display()
                );
            }
            Ok(())
        }
        Command::Ingest {
            file,
            provision,
            workers,
            json,
        } => {
            let (input, size) = open_input(file.as_deref()).map_err(RunError::Failed)?;
            let provisioning = provision
                .as_deref()
                .map(|p| read_provisioning(p).map(|file| (file, p)))
                .transpose()
                .map_err(RunError::Failed)?;
            if workers == Some(0) {
                return Err(RunError::Failed(anyhow!("--workers must be at least 1")));
            }
            let options = IngestOptions {
                workers: workers.unwrap_or(IngestOptions::default().workers),
                ..IngestOptions::default()
            };
            let db = open(url, options.workers as u32 + 1, policy);
            migrate::run(&db).map_err(db_error)?;
            if let Some((file, path)) = &provisioning {
                let loaded = load_provisioning(&db, file, path)?;
                log::info!(
                    "provisioned {} profiles, {} devices, {} sensors, {} alarms",
                    loaded.profiles,
                    loaded.devices,
                    loaded.sensors,
                    loaded.alarms
                );
            }
            let summary = ingest_with_progress(&db, input, size, &options)?;
            if json {
                println!("{}", serde_json::to_string(&summary).expect("serializable"));
            } else {
                println!("{}", summary.to_text());
            }
            Ok(())
        }
        Command::Gen {
            devices,
            messages,
            seed,
            provisioning,
            out,
        } => {
            let options = crate::gen::GenOptions {
                devices,
                messages,
                seed,
                ..Default::default()
            };
            if let Some(path) = provisioning {
                let text = serde_json::to_string_pretty(&crate::gen::provisioning(&options))
                    .expect("serializable");
                std::fs::write(&path, text + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))
                    .map_err(RunError::Failed)?;
            }
            let written = match out {
                Some(path) => File::create(&path)
                    .with_context(|| format!("cannot write {}", path.display()))
                    .and_then(|f| {
                        crate::gen::messages(&options, &mut io::BufWriter::new(f))
                            .with_context(|| format!("cannot write {}", path.display()))
                    }),
                None => {
                    crate::gen::messages(&options, &mut io::BufWriter::new(io::stdout().lock()))
                        .context("cannot write the messages")
                }
            };
            written.map_err(RunError::Failed)
        }
        Command::Status { json } => {
            let db = open(url, 1, policy);
            migrate::run(&db).map_err(db_error)?;
            let s = db.transaction(status::read).map_err(db_error)?;
            if json {
                println!("{}", serde_json::to_string(&s).expect("serializable"));
            } else {
                println!("messages processed: {}", s.processed_messages);
                println!("readings: {}", s.readings);
                println!("alerts: {} ({} open)", s.alerts, s.open_alerts);
                println!("devices: {}", s.devices);
                let kinds: Vec<String> = s
                    .dead_letters
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!(
                    "dead letters: {}",
                    if kinds.is_empty() {
                        "none".into()
                    } else {
                        kinds.join(", ")
                    }
                );
                println!(
                    "last message at: {}",
                    s.last_message_at.as_deref().unwrap_or("never")
                );
            }
            Ok(())
        }
    }
}

fn open(url: DatabaseUrl, pool_size: u32, policy: RetryPolicy) -> Database {
    log::debug!("database {url}");
    Database::open(
        url,
        PoolSettings {
            max_size: pool_size,
            ..PoolSettings::default()
        },
        policy,
    )
}

fn db_error(failure: Failure) -> RunError {
    match failure {
        Failure::GaveUp { .. } => RunError::GaveUp(anyhow!(failure)),
        other => RunError::Failed(anyhow!(other)),
    }
}

fn read_provisioning(path: &Path) -> anyhow::Result<Provisioning> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the provisioning file {}", path.display()))?;
    Provisioning::parse(&text)
        .map_err(|e| anyhow!("the provisioning file {} is invalid: {e}", path.display()))
}

fn load_provisioning(
    db: &Database,
    file: &Provisioning,
    path: &Path,
) -> Result<provisioning::Loaded, RunError> {
    db.transaction(|conn| provisioning::load(conn, file))
        .map_err(db_error)?
        .map_err(|e| {
            RunError::Failed(anyhow!(
                "the provisioning file {} is invalid: {e}",
                path.display()
            ))
        })
}

fn open_input(file: Option<&Path>) -> anyhow::Result<(Box<dyn BufRead + Send>, Option<u64>)> {
    match file {
        None => Ok((Box::new(BufReader::new(io::stdin())), None)),
        Some(p) if p == Path::new("-") => Ok((Box::new(BufReader::new(io::stdin())), None)),
        Some(p) => {
            let f = File::open(p)
                .with_context(|| format!("cannot open the input file {}", p.display()))?;
            let meta = f
                .metadata()
                .with_context(|| format!("cannot read {}", p.display()))?;
            if meta.is_dir() {
                bail!("the input {} is a directory, not a file", p.display());
            }
            Ok((
                Box::new(BufReader::with_capacity(256 * 1024, f)),
                Some(meta.len()),
            ))
        }
    }
}

fn ingest_with_progress(
    db: &Database,
    input: Box<dyn BufRead + Send>,
    size: Option<u64>,
    options: &IngestOptions,
) -> Result<Summary, RunError> {
    let progress = Progress::default();
    let bar = size.filter(|_| io::stderr().is_terminal()).map(|len| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {percent:>3}% {msg} [{elapsed_precise}, eta {eta}]",
            )
            .expect("a valid template"),
        );
        bar
    });
    let started = std::time::Instant::now();
    let mut last_draw = started;
    let result = pipeline::ingest(db, input, options, &progress, |s| {
        let Some(bar) = &bar else { return };
        if last_draw.elapsed() < pipeline::PROGRESS_INTERVAL {
            return;
        }
        last_draw = std::time::Instant::now();
        bar.set_position(progress.bytes_read.load(Ordering::Relaxed));
        let rate = s.completed as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{rate:.0} msg/s, processed {}, duplicate {}, dead letter {}",
            s.processed, s.duplicates, s.dead_letters
        ));
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result.map_err(|e| match e.downcast::<Stopped>() {
        Ok(stopped) => {
            eprintln!("{}", stopped.summary.to_text());
            match stopped.failure {
                Failure::GaveUp { .. } => RunError::GaveUp(anyhow!(stopped)),
                _ => RunError::Failed(anyhow!(stopped)),
            }
        }
        Err(other) => RunError::Failed(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
