//! The command line: arguments (`args.rs`), the context every command runs
//! in (settings, database URL, retry policy, pipeline options, built once),
//! and one function per command (`commands.rs`). Results print themselves;
//! `main` only calls [`main`] here.

mod args;
mod commands;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use clap::Parser;

pub use args::{Cli, Command, DeadLetterCommand, WorkerArgs};

use crate::config::{FileSettings, Settings};
use crate::db::{migrate, Database, DatabaseUrl, Failure, PoolSettings, RetryPolicy};
use crate::feed::publish::PublishOptions;
use crate::pipeline::{IngestError, IngestOptions, SQLITE_BATCH_SIZE, SQLITE_SERVE_BATCH_SIZE};
use crate::service::logfile::{self, LogFile};

/// Exit code of a run that gave up on an unreachable database.
pub const EXIT_GAVE_UP: u8 = 3;

/// Exit code of a run interrupted by a signal (128 + SIGINT, as shells do).
pub const EXIT_INTERRUPTED: u8 = 130;

/// What `main` turns into an exit code.
#[derive(Debug)]
pub enum RunError {
    /// Usage, set-up or database errors: exit 1.
    Failed(anyhow::Error),
    /// The database stayed unreachable: exit [`EXIT_GAVE_UP`].
    GaveUp(anyhow::Error),
    /// Interrupted by SIGINT or SIGTERM: exit [`EXIT_INTERRUPTED`].
    Interrupted(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Failed(e)
    }
}

impl From<Failure> for RunError {
    fn from(failure: Failure) -> Self {
        if failure.is_gave_up() {
            RunError::GaveUp(anyhow!(failure))
        } else {
            RunError::Failed(anyhow!(failure))
        }
    }
}

impl From<IngestError> for RunError {
    /// A stopped run prints what was done before it says why it stopped.
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Stopped(stopped) => {
                eprintln!("{}", stopped.summary.to_text());
                if stopped.failure.is_gave_up() {
                    RunError::GaveUp(anyhow!(stopped))
                } else {
                    RunError::Failed(anyhow!(stopped))
                }
            }
            IngestError::Interrupted(interrupted) => {
                eprintln!("{}", interrupted.summary.to_text());
                RunError::Interrupted(anyhow!(interrupted))
            }
            read_failed => RunError::Failed(read_failed.into()),
        }
    }
}

/// The whole program: parse, set up, run, map to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Failed(e)) => {
            say_last(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
        Err(RunError::GaveUp(e)) => {
            say_last(&format!("gave up: {e:#}"));
            ExitCode::from(EXIT_GAVE_UP)
        }
        Err(RunError::Interrupted(e)) => {
            say_last(&format!("{e:#}"));
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

/// The run's last word, once on stderr; in the log too when it goes to a
/// file (on stderr it would be the same sentence twice).
fn say_last(text: &str) {
    if logfile::to_file() {
        log::error!("{text}");
    }
    eprintln!("normalizer: {text}");
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), RunError> {
    let mut context = Context::new(&cli)?;
    match cli.command {
        Command::Migrate { json } => commands::migrate(&context, json),
        Command::Provision { file, json } => commands::provision(&context, &file, json),
        Command::Ingest {
            file,
            provision,
            json,
            ..
        } => commands::ingest(&context, file.as_deref(), provision.as_deref(), json),
        Command::Serve { .. } => commands::serve(&mut context),
        Command::Send {
            file,
            json,
            nats: Some(_),
            nats_timeout,
            nats_in_flight,
            ..
        } => {
            let input_name = match file.as_deref() {
                None => "-".to_string(),
                Some(p) => std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display()
                    .to_string(),
            };
            let nats = context
                .settings
                .nats
                .clone()
                .expect("--nats makes the NATS settings");
            let options = PublishOptions {
                servers: nats.servers,
                auth: nats.auth,
                in_flight: nats_in_flight,
                timeout: nats_timeout.unwrap_or(std::time::Duration::from_secs(60)),
                input_name,
            };
            commands::send_nats(file.as_deref(), options, json)
        }
        Command::Send {
            file,
            json,
            mqtt,
            mqtt_in_flight,
            ..
        } if mqtt.url.is_some() => {
            commands::send_mqtt(&context, file.as_deref(), &mqtt, mqtt_in_flight, json)
        }
        Command::Send { file, json, .. } => commands::send(&context, file.as_deref(), json),
        Command::Status { json } => commands::status(&context, json),
        Command::DeadLetters(command) => commands::dead_letters(&context, command),
        Command::Gen {
            devices,
            messages,
            seed,
            provisioning,
            out,
        } => commands::gen(
            crate::gen::GenOptions {
                devices: devices as usize,
                messages,
                seed,
                ..Default::default()
            },
            provisioning.as_deref(),
            out.as_deref(),
        ),
    }
}

/// How many connections a command's pool holds.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// One at a time: set-up and one-off commands.
    One,
    /// One per worker, and one for the reader's own transactions.
    Workers,
}

/// What every command runs with, built once from the command line.
struct Context {
    settings: Settings,
    url: DatabaseUrl,
    policy: RetryPolicy,
    options: IngestOptions,
    /// The log file, when logging to one (the service reopens it on SIGHUP).
    log_file: Option<Arc<LogFile>>,
}

impl Context {
    fn new(cli: &Cli) -> Result<Context, RunError> {
        let file = match &cli.config {
            Some(path) => FileSettings::load(path).map_err(|e| anyhow!(e))?,
            None => FileSettings::default(),
        };
        let batch_size_given = cli.flags().batch_size.is_some() || file.batch_size.is_some();
        let settings = Settings::resolve(cli.flags(), file).map_err(|e| anyhow!(e))?;
        if settings.workers == 0 {
            return Err(anyhow!("--workers must be at least 1").into());
        }
        if settings.batch_size == 0 {
            return Err(anyhow!("--batch-size must be at least 1").into());
        }
        if settings.max_connections == 0 {
            return Err(anyhow!("--max-connections must be at least 1").into());
        }
        // The service's log file is the service's: a one-off command writes
        // there only when told so on its own command line.
        let log_path = match cli.command {
            Command::Serve { .. } => settings.log_file.clone(),
            _ => cli.log_file.clone(),
        };
        let log_file = logfile::init(
            &settings.log_level,
            log_path.as_deref(),
            settings.log_format,
        )
        .with_context(|| match &log_path {
            Some(path) => format!("cannot open the log file {}", path.display()),
            None => "cannot set up logging".to_string(),
        })?;
        let url = DatabaseUrl::parse(&settings.database_url).map_err(|e| anyhow!(e))?;
        url.check().map_err(|e| anyhow!(e))?;
        let defaults = RetryPolicy::default();
        let policy = RetryPolicy {
            max_outage: settings.max_outage.unwrap_or(defaults.max_outage),
            ..defaults
        };
        let mut options = IngestOptions {
            workers: settings.workers,
            batch_size: settings.batch_size,
            batch_wait: settings.batch_wait,
            shutdown_timeout: settings.shutdown_timeout,
            ..IngestOptions::default()
        };
        if let (DatabaseUrl::Sqlite(_), false) = (&url, batch_size_given) {
            // `serve` keeps groups of 16,000, one pass: a transaction's
            // acknowledgements go out through each connection's bounded
            // channel, and a connection slow to read them holds the one
            // writer back; a larger group holds it longer (producers that
            // paused reading at a barrier deadlocked it with groups of
            // 48,000).
            options.batch_size = match cli.command {
                Command::Serve { .. } => SQLITE_SERVE_BATCH_SIZE,
                _ => SQLITE_BATCH_SIZE,
            };
        }
        Ok(Context {
            settings,
            url,
            policy,
            options,
            log_file,
        })
    }

    /// A pool on the database, not yet connected.
    fn open(&self, pool: Pool, policy: RetryPolicy) -> Database {
        let max_size = match pool {
            Pool::One => 1,
            Pool::Workers => self.options.workers as u32 + 1,
        };
        log::debug!("database {}", self.url);
        Database::open(
            self.url.clone(),
            PoolSettings {
                max_size,
                // A former owner of a feed's partitions, paused or cut off
                // mid-transaction, must not keep the row locks that the
                // partitions' new owner needs for longer than its lease.
                idle_in_transaction_timeout: self
                    .settings
                    .nats
                    .as_ref()
                    .map_or(PoolSettings::default().idle_in_transaction_timeout, |n| {
                        n.lease
                    }),
                ..PoolSettings::default()
            },
            policy,
        )
    }

    /// A pool on the database, with its migrations run.
    fn open_migrated(&self, pool: Pool) -> Result<Database, RunError> {
        self.open_migrated_with(pool, self.policy.clone())
    }

    fn open_migrated_with(&self, pool: Pool, policy: RetryPolicy) -> Result<Database, RunError> {
        let db = self.open(pool, policy);
        if self.settings.migrate {
            migrate::run(&db).map_err(|failure| self.setup_failure(failure))?;
        } else {
            let pending = migrate::pending(&db).map_err(|failure| self.setup_failure(failure))?;
            if !pending.is_empty() {
                return Err(anyhow!(
                    "the schema of {} is not up to date ({} migrations pending) and --no-migrate is set: run `normalizer migrate` as a role that may create tables",
                    self.url,
                    pending.len()
                )
                .into());
            }
        }
        Ok(db)
    }

    /// A connection refused for good at set-up names the database.
    fn setup_failure(&self, failure: Failure) -> RunError {
        match failure.refused_connection() {
            Some(why) => RunError::Failed(anyhow!(
                "cannot connect to the database at {}: {why}{}",
                self.url,
                crate::db::remedy(why).map_or(String::new(), |r| format!("; {r}"))
            )),
            None => failure.into(),
        }
    }
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
        let cli = Cli::try_parse_from([
            "normalizer",
            "dead-letters",
            "purge",
            "--kind",
            "unknown_device",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::DeadLetters(DeadLetterCommand::Purge {
                kind: crate::core::DeadLetterKind::UnknownDevice,
                ..
            })
        ));
        let err = Cli::try_parse_from(["normalizer", "dead-letters", "purge", "--kind", "unknown"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed, invalid"), "{err}");
    }
}
