//! The command line: arguments, settings, logging, and what each command
//! prints. `main` only calls [`main`] here.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::config::{parse_duration, parse_mode, FileSettings, FlagSettings, Settings};
use crate::core::provisioning::Provisioning;
use crate::core::DeadLetterKind;
use crate::db::repo::{dead_letters, provisioning, status};
use crate::db::{migrate, Database, DatabaseUrl, Failure, PoolSettings, RetryPolicy};
use crate::pipeline::{self, IngestError, IngestOptions, Progress, Summary};
use crate::service::{self, logfile, ServeOptions};

/// Exit code of a run that gave up on an unreachable database.
pub const EXIT_GAVE_UP: u8 = 3;

/// Turns raw sensor messages into readings and alerts.
#[derive(Debug, Parser)]
#[command(name = "normalizer", version, about)]
pub struct Cli {
    /// Settings file (TOML; the keys of the flags, with `_` for `-`).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,

    /// Database URL: postgres://…, postgresql://…, sqlite://PATH or a bare path
    /// [default: sqlite://normalizer.db].
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Log level (error, warn, info, debug, trace) [default: info]; RUST_LOG wins.
    #[arg(long, global = true)]
    pub log_level: Option<String>,

    /// Append the log to this file instead of stderr; SIGHUP reopens it.
    #[arg(long, global = true)]
    pub log_file: Option<PathBuf>,

    /// Give up after the database was unreachable this long [default: 5m].
    #[arg(long, value_parser = parse_duration, global = true)]
    pub max_outage: Option<Duration>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Worker threads and batching, for the commands that run the pipeline.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Worker threads [default: the number of CPUs].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most messages per transaction; 1 is one message per transaction [default: 1000].
    #[arg(long, env = "NORMALIZER_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// How long a worker waits for more messages to fill a batch [default: 2ms].
    #[arg(long, value_parser = parse_duration)]
    pub batch_wait: Option<Duration>,
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
        /// Worker threads.
        #[command(flatten)]
        workers: WorkerArgs,
        /// Print the final summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run as a service fed through a Unix domain socket.
    Serve {
        /// The socket to listen on [default: /run/normalizer/normalizer.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The socket file's mode, octal [default: 0660].
        #[arg(long, value_parser = parse_mode)]
        socket_mode: Option<u32>,
        /// Most producers connected at once [default: 64].
        #[arg(long)]
        max_connections: Option<usize>,
        /// How long a shutdown may take [default: 30s].
        #[arg(long, value_parser = parse_duration)]
        shutdown_timeout: Option<Duration>,
        /// How often to log a stats line [default: 60s].
        #[arg(long, value_parser = parse_duration)]
        stats_interval: Option<Duration>,
        /// Write the counters here in Prometheus text format each interval.
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        /// Worker threads.
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// Send a file to the service and wait for every acknowledgement.
    Send {
        /// The input file; standard input when absent or `-`.
        file: Option<PathBuf>,
        /// The service's socket [default: /run/normalizer/normalizer.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Counts from the database.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay or purge dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
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
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        /// Only this kind.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<DeadLetterKind>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run dead letters through the normal path again: those that now
    /// succeed disappear, the rest get attempts + 1.
    Replay {
        /// Only this kind.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<DeadLetterKind>,
        /// Worker threads.
        #[command(flatten)]
        workers: WorkerArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters of one kind.
    Purge {
        /// The kind to delete.
        #[arg(long, value_parser = parse_kind)]
        kind: DeadLetterKind,
        /// Only those last filed longer ago than this (e.g. 30d).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
}

fn parse_kind(s: &str) -> Result<DeadLetterKind, String> {
    DeadLetterKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = DeadLetterKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("{s:?} is not one of {}", kinds.join(", "))
    })
}

/// What `main` turns into an exit code.
#[derive(Debug)]
pub enum RunError {
    /// Usage, set-up or database errors: exit 1.
    Failed(anyhow::Error),
    /// The database stayed unreachable: exit [`EXIT_GAVE_UP`].
    GaveUp(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Failed(e)
    }
}

/// The whole program: parse, set up, run, map to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Failed(e)) => {
            log::error!("{e:#}");
            eprintln!("normalizer: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(RunError::GaveUp(e)) => {
            log::error!("gave up: {e:#}");
            eprintln!("normalizer: gave up: {e:#}");
            ExitCode::from(EXIT_GAVE_UP)
        }
    }
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let file = match &cli.config {
        Some(path) => FileSettings::load(path).map_err(|e| anyhow!(e))?,
        None => FileSettings::default(),
    };
    let mut flags = FlagSettings {
        database_url: cli.database_url.clone(),
        log_level: cli.log_level.clone(),
        log_file: cli.log_file.clone(),
        max_outage: cli.max_outage,
        ..FlagSettings::default()
    };
    match &cli.command {
        Command::Ingest { workers, .. }
        | Command::DeadLetters(DeadLetterCommand::Replay { workers, .. }) => {
            flags.workers = workers.workers;
            flags.batch_size = workers.batch_size;
            flags.batch_wait = workers.batch_wait;
        }
        Command::Serve {
            socket,
            socket_mode,
            max_connections,
            shutdown_timeout,
            stats_interval,
            metrics_file,
            workers,
        } => {
            flags.workers = workers.workers;
            flags.batch_size = workers.batch_size;
            flags.batch_wait = workers.batch_wait;
            flags.socket = socket.clone();
            flags.socket_mode = *socket_mode;
            flags.max_connections = *max_connections;
            flags.shutdown_timeout = *shutdown_timeout;
            flags.stats_interval = *stats_interval;
            flags.metrics_file = metrics_file.clone();
        }
        Command::Send { socket, .. } => flags.socket = socket.clone(),
        _ => {}
    }
    let settings = Settings::resolve(flags, file).map_err(|e| anyhow!(e))?;
    if settings.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if settings.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if settings.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    Ok(settings)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), RunError> {
    let settings = settings(&cli)?;
    let log_file = logfile::init(&settings.log_level, settings.log_file.as_deref())
        .with_context(|| format!("cannot open the log file {:?}", settings.log_file))?;
    let url = DatabaseUrl::parse(&settings.database_url).map_err(|e| anyhow!(e))?;
    let policy = RetryPolicy {
        max_outage: settings.max_outage,
        ..RetryPolicy::default()
    };
    let pipeline_options = IngestOptions {
        workers: settings.workers,
        batch_size: settings.batch_size,
        batch_wait: settings.batch_wait,
        ..IngestOptions::default()
    };
    match cli.command {
        Command::Migrate => {
            let db = open(url, 1, policy);
            let applied = migrate::run(&db).map_err(db_error)?;
            println!("{} migrations applied to {}", applied.len(), db.url());
        }
        Command::Provision { file, json } => {
            let provisioning = read_provisioning(&file)?;
            let db = open_migrated(url, 1, policy)?;
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
        }
        Command::Ingest {
            file,
            provision,
            json,
            ..
        } => {
            let (input, size) = open_input(file.as_deref())?;
            let provisioning = provision
                .as_deref()
                .map(|p| read_provisioning(p).map(|file| (file, p)))
                .transpose()?;
            let db = open_migrated(url, settings.workers as u32 + 1, policy)?;
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
            let summary = ingest_with_progress(&db, input, size, &pipeline_options)?;
            print_summary(&summary, json);
        }
        Command::Serve { .. } => {
            // A service waits until the database has space again: producers
            // are held back by the bounded queues meanwhile.
            let policy = RetryPolicy {
                resource_wait: None,
                ..policy
            };
            let db = open_migrated(url, settings.workers as u32 + 1, policy)?;
            let options = ServeOptions {
                socket: settings.socket.clone(),
                mode: settings.socket_mode,
                max_connections: settings.max_connections,
                shutdown_timeout: settings.shutdown_timeout,
                stats_interval: settings.stats_interval,
                metrics_file: settings.metrics_file.clone(),
                workers: pipeline_options,
            };
            match service::serve(&db, &options, log_file)? {
                service::Exit::Clean => {}
                service::Exit::GaveUp => {
                    return Err(RunError::GaveUp(anyhow!(
                        "the database stayed unreachable for {:?}; unacknowledged lines may be sent again",
                        settings.max_outage
                    )))
                }
            }
        }
        Command::Send { file, json, .. } => {
            let (input, _) = open_input(file.as_deref())?;
            let sent = service::client::send(&settings.socket, input)?;
            if json {
                println!("{}", serde_json::to_string(&sent).expect("serializable"));
            } else {
                let outcomes: Vec<String> = sent
                    .outcomes
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!(
                    "sent {}, acknowledged {}: {}",
                    sent.sent,
                    sent.acknowledged,
                    outcomes.join(", ")
                );
            }
            if let Some(error) = &sent.error {
                return Err(RunError::Failed(anyhow!("the service said: {error}")));
            }
            if !sent.complete() {
                return Err(RunError::Failed(anyhow!(
                    "{} of {} lines were not acknowledged (first: line {}); sending them again is safe",
                    sent.sent - sent.acknowledged,
                    sent.sent,
                    sent.unacknowledged.first().copied().unwrap_or_default()
                )));
            }
        }
        Command::Status { json } => {
            let db = open_migrated(url, 1, policy)?;
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
        }
        Command::DeadLetters(command) => {
            dead_letter_command(command, url, policy, &pipeline_options)?
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
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            match out {
                Some(path) => {
                    let f = File::create(&path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    crate::gen::messages(&options, &mut io::BufWriter::new(f))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                None => {
                    crate::gen::messages(&options, &mut io::BufWriter::new(io::stdout().lock()))
                        .context("cannot write the messages")?
                }
            }
        }
    }
    Ok(())
}

fn dead_letter_command(
    command: DeadLetterCommand,
    url: DatabaseUrl,
    policy: RetryPolicy,
    options: &IngestOptions,
) -> Result<(), RunError> {
    match command {
        DeadLetterCommand::List { kind, limit, json } => {
            let db = open_migrated(url, 1, policy)?;
            let rows = db
                .transaction(|c| dead_letters::list(c, kind.map(|k| k.as_str()), limit))
                .map_err(db_error)?;
            if json {
                println!("{}", serde_json::to_string(&rows).expect("serializable"));
            } else {
                println!(
                    "{:>6}  {:<14}  {:>8}  {:<20}  {:<16}  error",
                    "id", "kind", "attempts", "message", "device"
                );
                for r in &rows {
                    println!(
                        "{:>6}  {:<14}  {:>8}  {:<20}  {:<16}  {}",
                        r.id,
                        r.kind,
                        r.attempts,
                        r.message_id.as_deref().unwrap_or("-"),
                        r.device_key.as_deref().unwrap_or("-"),
                        r.error
                    );
                }
                println!("{} dead letters", rows.len());
            }
        }
        DeadLetterCommand::Replay { kind, json, .. } => {
            let db = open_migrated(url, options.workers as u32 + 1, policy)?;
            let rows = db
                .transaction(|c| dead_letters::list(c, kind.map(|k| k.as_str()), i64::MAX))
                .map_err(db_error)?;
            let (with_id, without): (Vec<_>, Vec<_>) =
                rows.into_iter().partition(|r| r.message_id.is_some());
            let mut text = String::new();
            for r in &with_id {
                text.push_str(&r.raw);
                text.push('\n');
            }
            let summary = pipeline::ingest(
                &db,
                io::Cursor::new(text.into_bytes()),
                options,
                &Progress::default(),
                |_| {},
            )
            .map_err(stopped_error)?;
            if !without.is_empty() {
                log::info!(
                    "{} dead letters have no readable id and cannot succeed; left as they are (purge them with `dead-letters purge`)",
                    without.len()
                );
            }
            print_summary(&summary, json);
        }
        DeadLetterCommand::Purge { kind, older_than } => {
            let db = open_migrated(url, 1, policy)?;
            let before = older_than
                .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() - d))
                .transpose()
                .map_err(|e| anyhow!("--older-than is too large: {e}"))?;
            let n = db
                .transaction(|c| dead_letters::purge(c, kind.as_str(), before))
                .map_err(db_error)?;
            println!("purged {n} dead letters of kind {kind}");
        }
    }
    Ok(())
}

fn print_summary(summary: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(summary).expect("serializable"));
    } else {
        println!("{}", summary.to_text());
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

fn open_migrated(
    url: DatabaseUrl,
    pool_size: u32,
    policy: RetryPolicy,
) -> Result<Database, RunError> {
    let db = open(url, pool_size, policy);
    migrate::run(&db).map_err(db_error)?;
    Ok(db)
}

fn db_error(failure: Failure) -> RunError {
    if failure.is_gave_up() {
        RunError::GaveUp(anyhow!(failure))
    } else {
        RunError::Failed(anyhow!(failure))
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
    provisioning::provision(db, file).map_err(|e| match e {
        provisioning::ProvisionError::Database(failure) => db_error(failure),
        invalid => RunError::Failed(anyhow!(
            "the provisioning file {} is invalid: {invalid}",
            path.display()
        )),
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

fn stopped_error(e: IngestError) -> RunError {
    match e {
        IngestError::Stopped(stopped) => {
            eprintln!("{}", stopped.summary.to_text());
            if stopped.failure.is_gave_up() {
                RunError::GaveUp(anyhow!(stopped))
            } else {
                RunError::Failed(anyhow!(stopped))
            }
        }
        read_failed => RunError::Failed(read_failed.into()),
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
    result.map_err(stopped_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn dead_letter_kinds_parse_by_their_contract_names() {
        assert_eq!(
            parse_kind("unknown_device").unwrap(),
            DeadLetterKind::UnknownDevice
        );
        assert!(parse_kind("unknown")
            .unwrap_err()
            .contains("malformed, invalid"));
    }
}
