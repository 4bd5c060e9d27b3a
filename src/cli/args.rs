//! The command line's arguments, as clap parses them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_duration, parse_mode, FlagSettings, NatsAuthSettings};
use crate::core::DeadLetterKind;
use crate::mqtt::MqttFlags;
use crate::secret::Secret;

/// Turns raw sensor messages into readings and alerts.
#[derive(Debug, Parser)]
#[command(name = "normalizer", version, about)]
pub struct Cli {
    /// Settings file (TOML; the keys of the flags, with `_` for `-`).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,

    /// Database URL: postgres://…, postgresql://…, sqlite://PATH or a bare path
    /// [default: sqlite://normalizer.db].
    /// Prefer --database-url-file, or a password in ~/.pgpass or libpq's
    /// passfile=: a flag shows in `ps`.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Read the database URL from this file (systemd: LoadCredential=).
    #[arg(long, env = "DATABASE_URL_FILE", global = true, value_name = "FILE")]
    pub database_url_file: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace, off) or a filter such as
    /// normalizer::db=debug [default: info]; RUST_LOG wins.
    #[arg(long, global = true, value_parser = parse_log_level)]
    pub log_level: Option<String>,

    /// Append the log to this file instead of stderr; SIGHUP reopens it.
    #[arg(long, global = true)]
    pub log_file: Option<PathBuf>,

    /// How log lines are written: text, or json (one object a line, the
    /// event's fields as keys) [default: text].
    #[arg(long, global = true, env = "NORMALIZER_LOG_FORMAT", value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,

    /// Give up after the database was unreachable this long [default: 5m; serve: never].
    #[arg(long, value_parser = parse_duration, global = true)]
    pub max_outage: Option<Duration>,

    /// Never run the migrations (for a role without DDL rights); a schema
    /// that is not up to date is then an error.
    #[arg(long, global = true)]
    pub no_migrate: bool,

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
    /// Most messages per transaction; 1 is one message per transaction [default: 5000; on SQLite 48000 for ingest (applied in passes of 24000), 16000 for serve].
    #[arg(long, env = "NORMALIZER_BATCH_SIZE", hide_env_values = true)]
    pub batch_size: Option<usize>,
    /// How long a worker waits for more messages to fill a batch [default: 2ms].
    #[arg(long, value_parser = parse_duration)]
    pub batch_wait: Option<Duration>,
}

/// The NATS feed's flags of `serve`.
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// Consume a NATS JetStream feed at these client URLs (comma-separated);
    /// with no --socket, no socket is opened.
    #[arg(long = "nats", value_name = "URLS")]
    pub servers: Option<String>,
    /// The stream [default: normalizer].
    #[arg(long = "nats-stream")]
    pub stream: Option<String>,
    /// The stream's partitions, when this instance creates it; an existing
    /// stream must have as many [default: 16].
    #[arg(long = "nats-partitions")]
    pub partitions: Option<u32>,
    /// The stream's replicas, when this instance creates it [default: 1].
    #[arg(long = "nats-replicas")]
    pub replicas: Option<usize>,
    /// How long a partition's lease lasts unrenewed: a dead instance's
    /// partitions move after this long [default: 10s].
    #[arg(long = "nats-lease", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// How to log in to NATS.
    #[command(flatten)]
    pub auth: NatsAuthArgs,
}

/// The MQTT broker's flags of `serve`. Secrets as for NATS: a flag, its
/// environment variable, the config file's `[mqtt]` table or a file.
#[derive(Debug, Args)]
pub struct MqttArgs {
    /// Read this MQTT broker: mqtt://[USER[:PASSWORD]@]HOST[:PORT] or
    /// mqtts://…; with no --socket, no socket is opened.
    #[arg(id = "mqtt", long = "mqtt", value_name = "URL")]
    pub url: Option<String>,
    /// A topic filter to subscribe to at QoS 1 (repeatable) [default: sensors/#].
    #[arg(id = "mqtt_topic", long = "mqtt-topic", value_name = "FILTER")]
    pub topics: Vec<String>,
    /// The client id; the broker keeps its session across restarts
    /// [default: normalizer-<host name>].
    #[arg(id = "mqtt_client_id", long = "mqtt-client-id", value_name = "ID")]
    pub client_id: Option<String>,
    /// MQTT user (or mqtt://USER:PASSWORD@host in the URL).
    #[arg(
        id = "mqtt_user",
        long = "mqtt-user",
        env = "MQTT_USER",
        value_name = "NAME"
    )]
    pub user: Option<String>,
    /// The MQTT user's password.
    #[arg(
        id = "mqtt_password",
        long = "mqtt-password",
        env = "MQTT_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,
    /// Read the MQTT user's password from this file.
    #[arg(
        id = "mqtt_password_file",
        long = "mqtt-password-file",
        env = "MQTT_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// Trust the broker's certificate signed by this CA (PEM); implies TLS.
    #[arg(id = "mqtt_ca", long = "mqtt-ca", env = "MQTT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for brokers that verify clients.
    #[arg(
        id = "mqtt_cert",
        long = "mqtt-cert",
        env = "MQTT_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        id = "mqtt_key",
        long = "mqtt-key",
        env = "MQTT_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
}

impl MqttArgs {
    fn apply(&self, flags: &mut FlagSettings) {
        flags.mqtt = MqttFlags {
            url: self.url.clone(),
            topics: self.topics.clone(),
            client_id: self.client_id.clone(),
            user: self.user.clone(),
            password: self.password.clone().map(Secret::new),
            password_file: self.password_file.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
    }
}

/// How to log in to NATS and check its servers (`serve` and `send`). Each
/// secret may come from a flag, its environment variable, the config
/// file's `[nats]` table or a file; a flag shows in `ps`, so prefer a file.
#[derive(Debug, Args)]
pub struct NatsAuthArgs {
    /// NATS user (or nats://USER:PASSWORD@host in the URL).
    #[arg(long = "nats-user", env = "NATS_USER", value_name = "NAME")]
    pub user: Option<String>,
    /// The NATS user's password.
    #[arg(
        long = "nats-password",
        env = "NATS_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,
    /// Read the NATS user's password from this file.
    #[arg(
        long = "nats-password-file",
        env = "NATS_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// A NATS authorization token.
    #[arg(
        long = "nats-token",
        env = "NATS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Read the NATS token from this file.
    #[arg(long = "nats-token-file", env = "NATS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Log in with the NKey whose seed (SU…) is in this file.
    #[arg(long = "nats-nkey", env = "NATS_NKEY", value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// Log in with this credentials file (user JWT and seed, decentralized auth).
    #[arg(long = "nats-creds", env = "NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// Trust the NATS servers' certificates signed by this CA (PEM).
    #[arg(long = "nats-ca", env = "NATS_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for servers that verify clients.
    #[arg(long = "nats-cert", env = "NATS_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "nats-key", env = "NATS_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Require TLS even for nats:// URLs (tls:// requires it anyway).
    #[arg(long = "nats-tls")]
    pub tls: bool,
}

impl NatsAuthArgs {
    fn apply(&self, flags: &mut FlagSettings) {
        flags.nats_auth = NatsAuthSettings {
            user: self.user.clone(),
            password: self.password.clone().map(Secret::new),
            password_file: self.password_file.clone(),
            token: self.token.clone().map(Secret::new),
            token_file: self.token_file.clone(),
            nkey: self.nkey.clone(),
            creds: self.creds.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls: self.tls.then_some(true),
        };
    }
}

impl NatsArgs {
    fn apply(&self, flags: &mut FlagSettings) {
        self.auth.apply(flags);
        flags.nats_servers = self.servers.clone();
        flags.nats_stream = self.stream.clone();
        flags.nats_partitions = self.partitions;
        flags.nats_replicas = self.replicas;
        flags.nats_lease = self.lease;
    }
}

/// The commands.
// `serve` holds every flag of three sources; the value is parsed once per
// process, so its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the database migrations and nothing else.
    Migrate {
        /// Print what was applied as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Run as a service fed through a Unix domain socket, a NATS JetStream
    /// stream, or both.
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
        /// Serve /metrics (Prometheus) and /healthz over HTTP on ADDR, e.g.
        /// 127.0.0.1:9465 [default: off].
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Worker threads.
        #[command(flatten)]
        workers: WorkerArgs,
        /// The NATS feed.
        #[command(flatten)]
        nats: NatsArgs,
        /// The MQTT broker.
        #[command(flatten)]
        mqtt: MqttArgs,
    },
    /// Send a file to the service and wait for every acknowledgement.
    Send {
        /// The input file; standard input when absent or `-`.
        file: Option<PathBuf>,
        /// The service's socket [default: /run/normalizer/normalizer.sock].
        #[arg(long, conflicts_with_all = ["nats", "mqtt"])]
        socket: Option<PathBuf>,
        /// Publish to a NATS JetStream feed at these client URLs
        /// (comma-separated) instead of the socket.
        #[arg(long, value_name = "URLS")]
        nats: Option<String>,
        /// How long one line may keep failing to be stored before `send`
        /// gives up (NATS only) [default: 60s].
        #[arg(long, value_parser = parse_duration, requires = "nats")]
        nats_timeout: Option<Duration>,
        /// Publishes awaiting JetStream's acknowledgement at most (NATS only).
        #[arg(long, default_value_t = 256, requires = "nats")]
        nats_in_flight: usize,
        /// How to log in to NATS.
        #[command(flatten)]
        nats_auth: NatsAuthArgs,
        /// Publish to an MQTT broker instead of the socket (--mqtt URL), each
        /// line at QoS 1 to sensors/<its device key>.
        #[command(flatten)]
        mqtt: MqttArgs,
        /// Publishes awaiting the broker's PUBACK at most (MQTT only).
        #[arg(long, default_value_t = 100, requires = "mqtt")]
        mqtt_in_flight: u16,
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
        /// Devices to provision (at least 1).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        devices: u32,
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
        /// Print what was purged as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A level, or a filter in RUST_LOG syntax whose targets are this crate's
/// (a bare word that is neither, like "verbose", would silently log
/// nothing of ours).
fn parse_log_level(s: &str) -> Result<String, String> {
    let valid = s.split(',').all(|directive| {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), Some(level)),
            None if directive.parse::<log::LevelFilter>().is_ok() => (None, Some(directive)),
            None => (Some(directive), None),
        };
        target.is_none_or(|t| t == "normalizer" || t.starts_with("normalizer::"))
            && level.is_none_or(|l| l.parse::<log::LevelFilter>().is_ok())
    });
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a level (error, warn, info, debug, trace, off) nor a filter such as normalizer::db=debug"
        ))
    }
}

fn parse_kind(s: &str) -> Result<DeadLetterKind, String> {
    DeadLetterKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = DeadLetterKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("{s:?} is not one of {}", kinds.join(", "))
    })
}

impl Cli {
    /// The settings given on the command line (and in the environment).
    pub fn flags(&self) -> FlagSettings {
        let mut flags = FlagSettings {
            database_url: self.database_url.clone(),
            database_url_file: self.database_url_file.clone(),
            log_level: self.log_level.clone(),
            log_file: self.log_file.clone(),
            log_format: self.log_format.clone(),
            max_outage: self.max_outage,
            no_migrate: self.no_migrate,
            ..FlagSettings::default()
        };
        match &self.command {
            Command::Ingest { workers, .. }
            | Command::DeadLetters(DeadLetterCommand::Replay { workers, .. }) => {
                workers.apply(&mut flags)
            }
            Command::Serve {
                socket,
                socket_mode,
                max_connections,
                shutdown_timeout,
                stats_interval,
                metrics_file,
                metrics_listen,
                workers,
                nats,
                mqtt,
            } => {
                workers.apply(&mut flags);
                nats.apply(&mut flags);
                mqtt.apply(&mut flags);
                flags.socket = socket.clone();
                flags.socket_mode = *socket_mode;
                flags.max_connections = *max_connections;
                flags.shutdown_timeout = *shutdown_timeout;
                flags.stats_interval = *stats_interval;
                flags.metrics_file = metrics_file.clone();
                flags.metrics_listen = *metrics_listen;
            }
            Command::Send {
                socket,
                nats,
                nats_auth,
                mqtt,
                ..
            } => {
                flags.socket = socket.clone();
                flags.nats_servers = nats.clone();
                nats_auth.apply(&mut flags);
                mqtt.apply(&mut flags);
            }
            _ => {}
        }
        flags
    }
}

impl WorkerArgs {
    fn apply(&self, flags: &mut FlagSettings) {
        flags.workers = self.workers;
        flags.batch_size = self.batch_size;
        flags.batch_wait = self.batch_wait;
    }
}
