//! One function per command, each over the [`Context`] built once.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::{Context, DeadLetterCommand, Pool, RunError};
use crate::core::provisioning::Provisioning;
use crate::db::repo::provisioning::{self, Loaded, ProvisionError};
use crate::db::repo::{dead_letters, status};
use crate::db::{migrate as migrations, Database, RetryPolicy};
use crate::feed::publish::{self, PublishOptions};
use crate::gen::GenOptions;
use crate::pipeline::{self, IngestOptions, Progress, Summary};
use crate::service::{self, ServeOptions};

/// `migrate`.
pub(super) fn migrate(context: &Context, json: bool) -> Result<(), RunError> {
    let db = context.open(Pool::One, context.policy.clone());
    let applied = migrations::run(&db)?;
    if json {
        print_json(&serde_json::json!({"applied": applied, "database": db.url().to_string()}));
    } else {
        println!("{} migrations applied to {}", applied.len(), db.url());
    }
    Ok(())
}

/// `provision FILE`.
pub(super) fn provision(context: &Context, file: &Path, json: bool) -> Result<(), RunError> {
    let provisioning = read_provisioning(file)?;
    let db = context.open_migrated(Pool::One)?;
    let loaded = load_provisioning(&db, &provisioning, file)?;
    if json {
        print_json(&loaded);
    } else {
        println!("{loaded} from {}", file.display());
    }
    Ok(())
}

/// `ingest [FILE]`.
pub(super) fn ingest(
    context: &Context,
    file: Option<&Path>,
    provision: Option<&Path>,
    json: bool,
) -> Result<(), RunError> {
    let (input, size) = open_input(file)?;
    let provisioning = provision
        .map(|path| read_provisioning(path).map(|file| (file, path)))
        .transpose()?;
    let db = context.open_migrated(Pool::Workers)?;
    if let Some((file, path)) = &provisioning {
        // Loaded before the log call: a disabled level skips its arguments.
        let loaded = load_provisioning(&db, file, path)?;
        log::info!("{loaded}");
    }
    // Ctrl-C or SIGTERM: stop reading, finish what is in flight, say where
    // to resume. A second one ends the process at once.
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, interrupt.clone())
            .and_then(|_| signal_hook::flag::register(signal, interrupt.clone()))
            .context("cannot install signal handlers")?;
    }
    let options = IngestOptions {
        interrupt: Some(interrupt),
        ..context.options.clone()
    };
    let summary = ingest_with_progress(&db, input, size, &options)?;
    print_summary(&summary, json);
    Ok(())
}

/// `serve`.
pub(super) fn serve(context: &mut Context) -> Result<(), RunError> {
    // A service waits out any outage unless told otherwise, and always
    // waits until the database has space again: producers are held back by
    // the bounded queues meanwhile.
    let policy = RetryPolicy {
        max_outage: context.settings.max_outage.unwrap_or(Duration::MAX),
        resource_wait: None,
        ..context.policy.clone()
    };
    let db = context.open_migrated_with(Pool::Workers, policy)?;
    let settings = &context.settings;
    let other_source = settings.nats.is_some() || settings.mqtt.is_some();
    let socket = (settings.socket_given || !other_source).then(|| settings.socket.clone());
    let options = ServeOptions {
        socket,
        nats: settings.nats.clone(),
        mqtt: settings.mqtt.clone(),
        mode: settings.socket_mode,
        max_connections: settings.max_connections,
        shutdown_timeout: settings.shutdown_timeout,
        stats_interval: settings.stats_interval,
        metrics_file: settings.metrics_file.clone(),
        metrics_listen: settings.metrics_listen,
        workers: context.options.clone(),
    };
    match service::serve(&db, &options, context.log_file.take())? {
        service::Exit::Clean => Ok(()),
        service::Exit::GaveUp => Err(RunError::GaveUp(anyhow!(
            "the database stayed unreachable for {:?} (--max-outage); unacknowledged lines may be sent again",
            settings.max_outage.unwrap_or_default()
        ))),
    }
}

/// `send --nats URLS [FILE]`.
pub(super) fn send_nats(
    file: Option<&Path>,
    options: PublishOptions,
    json: bool,
) -> Result<(), RunError> {
    let (input, _) = open_input(file)?;
    let published = publish::publish(&options, input)?;
    if json {
        print_json(&published);
    } else {
        println!("{published}");
    }
    Ok(())
}

/// `send --mqtt URL [FILE]`.
pub(super) fn send_mqtt(
    context: &Context,
    file: Option<&Path>,
    args: &super::args::MqttArgs,
    in_flight: u16,
    json: bool,
) -> Result<(), RunError> {
    if !args.topics.is_empty() {
        return Err(RunError::Failed(anyhow!(
            "send --mqtt publishes each line to sensors/<its device key>; --mqtt-topic is for serve"
        )));
    }
    let options = context
        .settings
        .mqtt
        .as_ref()
        .expect("--mqtt makes the MQTT settings");
    let (input, _) = open_input(file)?;
    let published = crate::mqtt::publish::publish(options, input, in_flight)?;
    if json {
        print_json(&published);
    } else {
        println!("{published}");
    }
    if !published.skipped.is_empty() {
        return Err(RunError::Failed(anyhow!(
            "{} lines over 1 MiB were not sent (first: line {})",
            published.skipped.len(),
            published.skipped[0]
        )));
    }
    Ok(())
}

/// `send [FILE]`.
pub(super) fn send(context: &Context, file: Option<&Path>, json: bool) -> Result<(), RunError> {
    let (input, _) = open_input(file)?;
    let sent = service::client::send(&context.settings.socket, input)?;
    if json {
        print_json(&sent);
    } else {
        println!("{sent}");
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
    Ok(())
}

/// `status`.
pub(super) fn status(context: &Context, json: bool) -> Result<(), RunError> {
    let db = context.open_migrated(Pool::One)?;
    let s = db.read(status::read)?;
    if json {
        print_json(&s);
    } else {
        println!("{}", s.to_text());
    }
    Ok(())
}

/// `dead-letters list|replay|purge`.
pub(super) fn dead_letters(context: &Context, command: DeadLetterCommand) -> Result<(), RunError> {
    match command {
        DeadLetterCommand::List { kind, limit, json } => {
            let db = context.open_migrated(Pool::One)?;
            let kind = kind.map(|k| k.as_str());
            let (rows, total) = db.read(|c| {
                Ok((
                    dead_letters::list(c, kind, limit)?,
                    dead_letters::count(c, kind)?,
                ))
            })?;
            if json {
                print_json(&rows);
            } else {
                println!("{}", dead_letters::to_text(&rows, total));
            }
        }
        DeadLetterCommand::Replay { kind, json, .. } => {
            let db = context.open_migrated(Pool::Workers)?;
            let rows =
                db.transaction(|c| dead_letters::list(c, kind.map(|k| k.as_str()), i64::MAX))?;
            let (with_id, without): (Vec<_>, Vec<_>) =
                rows.into_iter().partition(|r| r.message_id.is_some());
            let text: String = with_id.iter().map(|r| format!("{}\n", r.raw)).collect();
            let summary = pipeline::ingest(
                &db,
                io::Cursor::new(text.into_bytes()),
                &context.options,
                &Progress::default(),
                |_| {},
            )?;
            if !without.is_empty() {
                log::info!(
                    "{} dead letters have no readable id and cannot succeed; left as they are (purge them with `dead-letters purge`)",
                    without.len()
                );
            }
            print_summary(&summary, json);
        }
        DeadLetterCommand::Purge {
            kind,
            older_than,
            json,
        } => {
            let db = context.open_migrated(Pool::One)?;
            let before = older_than
                .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() - d))
                .transpose()
                .map_err(|e| anyhow!("--older-than is too large: {e}"))?;
            let n = db.transaction(|c| dead_letters::purge(c, kind.as_str(), before))?;
            if json {
                print_json(&serde_json::json!({"purged": n, "kind": kind.as_str()}));
            } else {
                println!("purged {n} dead letters of kind {kind}");
            }
        }
    }
    Ok(())
}

/// `gen`.
pub(super) fn gen(
    options: GenOptions,
    provisioning: Option<&Path>,
    out: Option<&Path>,
) -> Result<(), RunError> {
    if let Some(path) = provisioning {
        let text = serde_json::to_string_pretty(&crate::gen::provisioning(&options))
            .expect("serializable");
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match out {
        Some(path) => {
            let f =
                File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
            crate::gen::messages(&options, &mut io::BufWriter::new(f))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => crate::gen::messages(&options, &mut io::BufWriter::new(io::stdout().lock()))
            .context("cannot write the messages")?,
    }
    Ok(())
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string(value).expect("serializable"));
}

fn print_summary(summary: &Summary, json: bool) {
    if json {
        print_json(summary);
    } else {
        println!("{}", summary.to_text());
    }
}

fn read_provisioning(path: &Path) -> anyhow::Result<Provisioning> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the provisioning file {}", path.display()))?;
    Provisioning::parse(&text)
        .map_err(|e| anyhow!("the provisioning file {} is invalid: {e}", path.display()))
}

fn load_provisioning(db: &Database, file: &Provisioning, path: &Path) -> Result<Loaded, RunError> {
    provisioning::provision(db, file).map_err(|e| match e {
        ProvisionError::Database(failure) => failure.into(),
        invalid => RunError::Failed(anyhow!(
            "the provisioning file {} is invalid: {invalid}",
            path.display()
        )),
    })
}

type Input = (Box<dyn BufRead + Send>, Option<u64>);

/// The input and its size, when it is a file.
fn open_input(file: Option<&Path>) -> anyhow::Result<Input> {
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

/// `ingest` with a progress bar on a terminal.
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
    Ok(result?)
}
