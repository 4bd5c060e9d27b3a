//! Settings from flags, the environment, a TOML file and defaults, in that
//! order of precedence. Defaults live in `impl Default for Settings`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::db::DEFAULT_URL;
use crate::feed::connect::split_credentials;
use crate::feed::{Login, NatsAuth, NatsOptions, Tls};
use crate::mqtt::{MqttFile, MqttFlags, MqttOptions};
use crate::pipeline::IngestOptions;
use crate::secret::{read_secret_file, Secret};
use crate::service::logfile::LogFormat;

/// Every setting that a config file may hold (the same keys as the flags,
/// with `_` for `-`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSettings {
    /// `--database-url`
    pub database_url: Option<String>,
    /// `--database-url-file`
    pub database_url_file: Option<PathBuf>,
    /// `--log-level`
    pub log_level: Option<String>,
    /// `--log-file`
    pub log_file: Option<PathBuf>,
    /// `--log-format`: "text" or "json"
    pub log_format: Option<String>,
    /// `--max-outage`, e.g. "5m"
    pub max_outage: Option<String>,
    /// `false` is `--no-migrate`.
    pub migrate: Option<bool>,
    /// `--workers`
    pub workers: Option<usize>,
    /// `--batch-size`
    pub batch_size: Option<usize>,
    /// `--batch-wait`, e.g. "2ms"
    pub batch_wait: Option<String>,
    /// `--socket`
    pub socket: Option<PathBuf>,
    /// `--socket-mode`, octal text such as "0660"
    pub socket_mode: Option<String>,
    /// `--max-connections`
    pub max_connections: Option<usize>,
    /// `--shutdown-timeout`, e.g. "30s"
    pub shutdown_timeout: Option<String>,
    /// `--stats-interval`, e.g. "60s"
    pub stats_interval: Option<String>,
    /// `--metrics-file`
    pub metrics_file: Option<PathBuf>,
    /// `--metrics-listen`, e.g. "127.0.0.1:9465"
    pub metrics_listen: Option<String>,
    /// `--nats`: the NATS cluster's client URLs, comma-separated.
    pub nats_servers: Option<String>,
    /// The `[nats]` table: every NATS setting in one place.
    pub nats: Option<NatsFile>,
    /// The `[mqtt]` table: the MQTT broker to read.
    pub mqtt: Option<MqttFile>,
}

/// The `[nats]` table of a config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct NatsFile {
    /// `--nats`
    pub servers: Option<String>,
    /// `--nats-stream`
    pub stream: Option<String>,
    /// `--nats-partitions`
    pub partitions: Option<u32>,
    /// `--nats-replicas`
    pub replicas: Option<usize>,
    /// `--nats-lease`, e.g. "10s"
    pub lease: Option<String>,
    /// `--nats-user`
    pub user: Option<String>,
    /// `--nats-password`
    pub password: Option<Secret>,
    /// `--nats-password-file`
    pub password_file: Option<PathBuf>,
    /// `--nats-token`
    pub token: Option<Secret>,
    /// `--nats-token-file`
    pub token_file: Option<PathBuf>,
    /// `--nats-nkey`: a file holding an NKey seed.
    pub nkey: Option<PathBuf>,
    /// `--nats-creds`: a credentials file (user JWT and seed).
    pub creds: Option<PathBuf>,
    /// `--nats-ca`
    pub ca: Option<PathBuf>,
    /// `--nats-cert`
    pub cert: Option<PathBuf>,
    /// `--nats-key`
    pub key: Option<PathBuf>,
    /// `--nats-tls`
    pub tls: Option<bool>,
}

impl NatsFile {
    fn auth(&self) -> NatsAuthSettings {
        NatsAuthSettings {
            user: self.user.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            nkey: self.nkey.clone(),
            creds: self.creds.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls: self.tls,
        }
    }
}

/// How to log in to NATS and check its servers, as one source (the flags
/// and their environment variables, or the config file) gives it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsAuthSettings {
    /// `--nats-user` or `NATS_USER`
    pub user: Option<String>,
    /// `--nats-password` or `NATS_PASSWORD`
    pub password: Option<Secret>,
    /// `--nats-password-file` or `NATS_PASSWORD_FILE`
    pub password_file: Option<PathBuf>,
    /// `--nats-token` or `NATS_TOKEN`
    pub token: Option<Secret>,
    /// `--nats-token-file` or `NATS_TOKEN_FILE`
    pub token_file: Option<PathBuf>,
    /// `--nats-nkey` or `NATS_NKEY`: a seed file.
    pub nkey: Option<PathBuf>,
    /// `--nats-creds` or `NATS_CREDS`: a credentials file.
    pub creds: Option<PathBuf>,
    /// `--nats-ca` or `NATS_CA`
    pub ca: Option<PathBuf>,
    /// `--nats-cert` or `NATS_CERT`
    pub cert: Option<PathBuf>,
    /// `--nats-key` or `NATS_KEY`
    pub key: Option<PathBuf>,
    /// `--nats-tls`
    pub tls: Option<bool>,
}

impl FileSettings {
    /// Reads a TOML config file. Errors name the file and line, never the
    /// line's text (it may hold a password).
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            format!(
                "the config file {} is invalid{}: {}",
                path.display(),
                line.map_or(String::new(), |l| format!(" at line {l}")),
                e.message()
            )
        })
    }
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// Database URL.
    pub database_url: String,
    /// Log filter (RUST_LOG syntax).
    pub log_level: String,
    /// Log file (append); stderr when absent.
    pub log_file: Option<PathBuf>,
    /// Text or JSON lines.
    pub log_format: LogFormat,
    /// Give up after the database was unreachable this long; when not set,
    /// each command's own default (`ingest` 5 minutes; `serve` never).
    pub max_outage: Option<Duration>,
    /// Whether commands may run the migrations (`false`: a role that must
    /// never run DDL; the schema must be up to date).
    pub migrate: bool,
    /// Worker threads.
    pub workers: usize,
    /// Most messages per transaction.
    pub batch_size: usize,
    /// How long a worker waits to fill a batch.
    pub batch_wait: Duration,
    /// The service's socket.
    pub socket: PathBuf,
    /// The socket file's mode.
    pub socket_mode: u32,
    /// Most producers connected at once.
    pub max_connections: usize,
    /// How long a shutdown may take.
    pub shutdown_timeout: Duration,
    /// How often the service logs its stats line (and writes the metrics).
    pub stats_interval: Duration,
    /// Prometheus text file, rewritten each interval.
    pub metrics_file: Option<PathBuf>,
    /// Where to serve `/metrics` and `/healthz` over HTTP (off: none).
    pub metrics_listen: Option<SocketAddr>,
    /// Whether the socket was asked for (flag or file), not defaulted: with
    /// NATS and no socket asked for, `serve` opens none.
    pub socket_given: bool,
    /// The NATS feed, when `--nats` (or `nats_servers`) is set.
    pub nats: Option<NatsOptions>,
    /// The MQTT broker, when `--mqtt` (or `[mqtt] url`) is set.
    pub mqtt: Option<MqttOptions>,
}

impl Default for Settings {
    /// The service's own defaults; the pipeline's and the retry policy's
    /// come from their own `impl Default`.
    fn default() -> Self {
        let pipeline = IngestOptions::default();
        Settings {
            database_url: DEFAULT_URL.to_string(),
            log_level: "info".to_string(),
            log_file: None,
            log_format: LogFormat::Text,
            max_outage: None,
            migrate: true,
            workers: pipeline.workers,
            batch_size: pipeline.batch_size,
            batch_wait: pipeline.batch_wait,
            socket: PathBuf::from("/run/normalizer/normalizer.sock"),
            socket_mode: 0o660,
            max_connections: 64,
            shutdown_timeout: pipeline.shutdown_timeout,
            stats_interval: Duration::from_secs(60),
            metrics_file: None,
            metrics_listen: None,
            socket_given: false,
            nats: None,
            mqtt: None,
        }
    }
}

/// Parses "0660" or "660" as an octal file mode.
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal file mode like 0660"))?;
    if mode > 0o777 {
        return Err(format!("{s:?} is not a file mode (at most 0777)"));
    }
    Ok(mode)
}

/// Parses `500ms`, `30s`, `5m`, `1h` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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
        "d" => n * 86400.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// The flags' side of the settings: `None` where the flag (or its
/// environment variable) was not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagSettings {
    /// `--database-url` or `DATABASE_URL`
    pub database_url: Option<String>,
    /// `--database-url-file` or `DATABASE_URL_FILE`
    pub database_url_file: Option<PathBuf>,
    /// `--log-level`
    pub log_level: Option<String>,
    /// `--log-file`
    pub log_file: Option<PathBuf>,
    /// `--log-format`
    pub log_format: Option<String>,
    /// `--max-outage`
    pub max_outage: Option<Duration>,
    /// `--no-migrate`
    pub no_migrate: bool,
    /// `--workers`
    pub workers: Option<usize>,
    /// `--batch-size` or `NORMALIZER_BATCH_SIZE`
    pub batch_size: Option<usize>,
    /// `--batch-wait`
    pub batch_wait: Option<Duration>,
    /// `--socket`
    pub socket: Option<PathBuf>,
    /// `--socket-mode`
    pub socket_mode: Option<u32>,
    /// `--max-connections`
    pub max_connections: Option<usize>,
    /// `--shutdown-timeout`
    pub shutdown_timeout: Option<Duration>,
    /// `--stats-interval`
    pub stats_interval: Option<Duration>,
    /// `--metrics-file`
    pub metrics_file: Option<PathBuf>,
    /// `--metrics-listen`
    pub metrics_listen: Option<SocketAddr>,
    /// `--nats`
    pub nats_servers: Option<String>,
    /// `--nats-stream`
    pub nats_stream: Option<String>,
    /// `--nats-partitions`
    pub nats_partitions: Option<u32>,
    /// `--nats-replicas`
    pub nats_replicas: Option<usize>,
    /// `--nats-lease`
    pub nats_lease: Option<Duration>,
    /// How to log in to NATS (`send --nats` as `serve`).
    pub nats_auth: NatsAuthSettings,
    /// The `--mqtt…` flags.
    pub mqtt: MqttFlags,
}

impl Settings {
    /// Flags (and their environment variables) first, then the file, then
    /// the defaults.
    pub(crate) fn resolve(flags: FlagSettings, file: FileSettings) -> Result<Settings, String> {
        let d = Settings::default();
        let duration = |v: Option<String>, key: &str| {
            v.map(|s| parse_duration(&s).map_err(|e| format!("config `{key}`: {e}")))
                .transpose()
        };
        let socket_given = flags.socket.is_some() || file.socket.is_some();
        let nats = resolve_nats(&flags, file.nats_servers.clone(), file.nats.clone())?;
        let mqtt = crate::mqtt::resolve(&flags.mqtt, file.mqtt.as_ref())?;
        Ok(Settings {
            socket_given,
            nats,
            mqtt,
            database_url: first_secret(
                [
                    (
                        flags.database_url.map(Secret::new),
                        flags.database_url_file.as_deref(),
                        "--database-url",
                    ),
                    (
                        file.database_url.clone().map(Secret::new),
                        file.database_url_file.as_deref(),
                        "database_url",
                    ),
                ],
                "the database URL",
            )?
            .map_or(d.database_url, |s| s.expose().trim().to_string()),
            log_level: flags.log_level.or(file.log_level).unwrap_or(d.log_level),
            log_file: flags.log_file.or(file.log_file),
            log_format: match flags.log_format.or(file.log_format) {
                Some(f) => f.parse().map_err(|e| format!("config `log_format`: {e}"))?,
                None => d.log_format,
            },
            max_outage: flags
                .max_outage
                .or(duration(file.max_outage, "max_outage")?),
            migrate: !flags.no_migrate && file.migrate.unwrap_or(d.migrate),
            workers: flags.workers.or(file.workers).unwrap_or(d.workers),
            batch_size: flags.batch_size.or(file.batch_size).unwrap_or(d.batch_size),
            batch_wait: flags
                .batch_wait
                .or(duration(file.batch_wait, "batch_wait")?)
                .unwrap_or(d.batch_wait),
            socket: flags.socket.or(file.socket).unwrap_or(d.socket),
            socket_mode: match (flags.socket_mode, file.socket_mode) {
                (Some(m), _) => m,
                (None, Some(s)) => {
                    parse_mode(&s).map_err(|e| format!("config `socket_mode`: {e}"))?
                }
                (None, None) => d.socket_mode,
            },
            max_connections: flags
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            shutdown_timeout: flags
                .shutdown_timeout
                .or(duration(file.shutdown_timeout, "shutdown_timeout")?)
                .unwrap_or(d.shutdown_timeout),
            stats_interval: flags
                .stats_interval
                .or(duration(file.stats_interval, "stats_interval")?)
                .unwrap_or(d.stats_interval),
            metrics_file: flags.metrics_file.or(file.metrics_file),
            metrics_listen: match flags.metrics_listen {
                Some(addr) => Some(addr),
                None => file
                    .metrics_listen
                    .map(|s| {
                        s.parse().map_err(|e| {
                            format!("config `metrics_listen`: {s:?} is not an address such as 127.0.0.1:9465 ({e})")
                        })
                    })
                    .transpose()?,
            },
        })
    }
}

/// The NATS settings: flags, then the file's `[nats]` table (or its
/// `nats_servers` key), then the defaults. None without servers.
fn resolve_nats(
    flags: &FlagSettings,
    servers: Option<String>,
    table: Option<NatsFile>,
) -> Result<Option<NatsOptions>, String> {
    let table = table.unwrap_or_default();
    if servers.is_some() && table.servers.is_some() {
        return Err("config: `nats_servers` and `[nats] servers` both set; keep one".into());
    }
    let Some(servers) = flags
        .nats_servers
        .clone()
        .or(table.servers.clone())
        .or(servers)
    else {
        return Ok(None);
    };
    let (servers, from_url) = split_credentials(&servers).map_err(|e| format!("--nats {e}"))?;
    let auth = resolve_auth(&flags.nats_auth, &table.auth(), from_url)?;
    let d = NatsOptions::default();
    let lease = match (flags.nats_lease, table.lease) {
        (Some(l), _) => l,
        (None, Some(s)) => parse_duration(&s).map_err(|e| format!("config `nats.lease`: {e}"))?,
        (None, None) => d.lease,
    };
    if lease < Duration::from_secs(2) {
        return Err(format!("the NATS lease must be at least 2s, not {lease:?}"));
    }
    let partitions = flags
        .nats_partitions
        .or(table.partitions)
        .unwrap_or(d.partitions);
    if partitions == 0 {
        return Err("--nats-partitions must be at least 1".into());
    }
    let stream = flags
        .nats_stream
        .clone()
        .or(table.stream)
        .unwrap_or(d.stream);
    if stream.is_empty()
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "--nats-stream {stream:?}: use letters, digits, - and _"
        ));
    }
    Ok(Some(NatsOptions {
        servers,
        auth,
        stream,
        partitions,
        replicas: flags.nats_replicas.or(table.replicas).unwrap_or(d.replicas),
        lease,
        ..d
    }))
}

/// A secret given directly or as a file, by one source; both is an error.
fn one_secret(
    value: Option<Secret>,
    file: Option<&Path>,
    flag: &str,
    what: &str,
) -> Result<Option<Secret>, String> {
    match (value, file) {
        // `--nats-password` and `--nats-password-file`; `nats.password`
        // and `nats.password_file`.
        (Some(_), Some(_)) => {
            let separator = if flag.starts_with("--") { '-' } else { '_' };
            Err(format!(
                "{flag} and {flag}{separator}file both set; keep one"
            ))
        }
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(path, what).map(Some),
        (None, None) => Ok(None),
    }
}

/// The first source (flags, then the file) that gives the secret.
fn first_secret(
    sources: [(Option<Secret>, Option<&Path>, &str); 2],
    what: &str,
) -> Result<Option<Secret>, String> {
    for (value, file, flag) in sources {
        if let Some(secret) = one_secret(value, file, flag, what)? {
            return Ok(Some(secret));
        }
    }
    Ok(None)
}

/// Every way to log in that the settings give, the secrets read.
fn logins(flags: &NatsAuthSettings, file: &NatsAuthSettings) -> Result<Vec<Login>, String> {
    let password = first_secret(
        [
            (
                flags.password.clone(),
                flags.password_file.as_deref(),
                "--nats-password",
            ),
            (
                file.password.clone(),
                file.password_file.as_deref(),
                "nats.password",
            ),
        ],
        "the NATS password",
    )?;
    let token = first_secret(
        [
            (
                flags.token.clone(),
                flags.token_file.as_deref(),
                "--nats-token",
            ),
            (file.token.clone(), file.token_file.as_deref(), "nats.token"),
        ],
        "the NATS token",
    )?;
    let user = flags.user.clone().or(file.user.clone());
    let nkey = flags.nkey.clone().or(file.nkey.clone());
    let creds = flags.creds.clone().or(file.creds.clone());
    let mut logins = Vec::new();
    match (user, password) {
        (Some(user), Some(password)) => logins.push(Login::UserPassword { user, password }),
        (Some(_), None) => {
            return Err("--nats-user needs its password: --nats-password-file, NATS_PASSWORD or --nats-password".into())
        }
        (None, Some(_)) => return Err("a NATS password needs its user: --nats-user".into()),
        (None, None) => {}
    }
    if let Some(token) = token {
        logins.push(Login::Token(token));
    }
    if let Some(file) = nkey {
        let seed = read_secret_file(&file, "the NKey seed")?;
        let seed = Secret::new(seed.expose().trim());
        logins.push(Login::NKey { file, seed });
    }
    if let Some(file) = creds {
        // As it is: the format's last line must end with its line end.
        let contents = std::fs::read_to_string(&file)
            .map(Secret::new)
            .map_err(|e| {
                format!(
                    "cannot read the NATS credentials from {}: {e}",
                    file.display()
                )
            })?;
        logins.push(Login::Credentials { file, contents });
    }
    Ok(logins)
}

/// The NATS login and TLS settings: the flags' (and environment's) first,
/// then the file's, then the URLs' user info. One way to log in at most.
fn resolve_auth(
    flags: &NatsAuthSettings,
    file: &NatsAuthSettings,
    from_url: Option<Login>,
) -> Result<NatsAuth, String> {
    let mut logins = logins(flags, file)?;
    if let Some(login) = from_url {
        logins.push(login);
    }
    if logins.len() > 1 {
        let given: Vec<String> = logins.iter().map(Login::described).collect();
        return Err(format!(
            "give one way to log in to NATS, not {} (a user and password, in the URL or as settings; a token; an NKey; or a credentials file)",
            given.join(" and ")
        ));
    }
    let auth = NatsAuth {
        login: logins.pop().unwrap_or_default(),
        tls: Tls {
            require: flags.tls.or(file.tls).unwrap_or(false),
            ca: flags.ca.clone().or(file.ca.clone()),
            cert: flags.cert.clone().or(file.cert.clone()),
            key: flags.key.clone().or(file.key.clone()),
        },
    };
    crate::feed::connect::check(&auth)?;
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileSettings = toml::from_str(
            "database_url = \"postgres://app:pw@db/n\"\nworkers = 3\nstats_interval = \"10s\"\nsocket_mode = \"0600\"\n",
        )
        .unwrap();
        let flags = FlagSettings {
            workers: Some(7),
            ..FlagSettings::default()
        };
        let s = Settings::resolve(flags, file).unwrap();
        assert_eq!(s.workers, 7);
        assert_eq!(s.database_url, "postgres://app:pw@db/n");
        assert_eq!(s.stats_interval, Duration::from_secs(10));
        assert_eq!(s.socket_mode, 0o600);
        assert_eq!(s.shutdown_timeout, Settings::default().shutdown_timeout);
    }

    #[test]
    fn a_bad_config_file_is_named_without_echoing_its_text() {
        let dir = tempfile_dir();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://app:s3cret@db/n\"\nworkers = \"many\"\n",
        )
        .unwrap();
        let e = FileSettings::load(&path).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::write(&path, "databse_url = \"x\"\n").unwrap();
        assert!(FileSettings::load(&path)
            .unwrap_err()
            .contains("unknown field"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("normalizer-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/normalizer.toml"
        ));
        let file = FileSettings::load(path).unwrap();
        let s = Settings::resolve(FlagSettings::default(), file).unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/normalizer/normalizer.sock"));
        assert_eq!(s.socket_mode, 0o660);
        assert!(s.metrics_file.is_some());
        assert_eq!(s.max_outage, None, "the service waits out any outage");
    }

    #[test]
    fn metrics_listen_is_an_address_from_the_flag_or_the_file() {
        let off = Settings::resolve(FlagSettings::default(), FileSettings::default()).unwrap();
        assert_eq!(off.metrics_listen, None, "off by default");
        let file: FileSettings = toml::from_str("metrics_listen = \"127.0.0.1:9465\"\n").unwrap();
        let s = Settings::resolve(FlagSettings::default(), file.clone()).unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9465".parse().unwrap()));
        let flags = FlagSettings {
            metrics_listen: Some("[::1]:9000".parse().unwrap()),
            ..FlagSettings::default()
        };
        let s = Settings::resolve(flags, file).unwrap();
        assert_eq!(s.metrics_listen, Some("[::1]:9000".parse().unwrap()));
        let bad: FileSettings = toml::from_str("metrics_listen = \"localhost\"\n").unwrap();
        let e = Settings::resolve(FlagSettings::default(), bad).unwrap_err();
        assert!(
            e.starts_with("config `metrics_listen`: \"localhost\""),
            "{e}"
        );
    }

    #[test]
    fn nats_settings_come_from_flags_the_nats_table_or_nats_servers() {
        let none = Settings::resolve(FlagSettings::default(), FileSettings::default()).unwrap();
        assert_eq!(none.nats, None);
        let file: FileSettings = toml::from_str(
            "[nats]\nservers = \"nats://a:4222,nats://b:4222\"\npartitions = 8\nlease = \"6s\"\n",
        )
        .unwrap();
        let s = Settings::resolve(FlagSettings::default(), file.clone()).unwrap();
        let nats = s.nats.unwrap();
        assert_eq!(nats.servers, "nats://a:4222,nats://b:4222");
        assert_eq!(nats.partitions, 8);
        assert_eq!(nats.lease, Duration::from_secs(6));
        assert_eq!(nats.stream, "normalizer");
        assert!(!s.socket_given);
        let flags = FlagSettings {
            nats_partitions: Some(4),
            socket: Some(PathBuf::from("/tmp/s")),
            ..FlagSettings::default()
        };
        let s = Settings::resolve(flags, file).unwrap();
        assert_eq!(s.nats.unwrap().partitions, 4);
        assert!(s.socket_given);
        let key: FileSettings = toml::from_str("nats_servers = \"nats://c:4222\"\n").unwrap();
        let s = Settings::resolve(FlagSettings::default(), key).unwrap();
        assert_eq!(s.nats.unwrap().servers, "nats://c:4222");
        let bad: FileSettings =
            toml::from_str("[nats]\nservers = \"nats://c:4222\"\nstream = \"a.b\"\n").unwrap();
        assert!(Settings::resolve(FlagSettings::default(), bad).is_err());
    }

    #[test]
    fn nats_logins_come_from_one_place_and_one_way_only() {
        let resolve = |flags: NatsAuthSettings, file: &str| {
            let file: FileSettings =
                toml::from_str(&format!("[nats]\nservers = \"nats://h:4222\"\n{file}")).unwrap();
            let flags = FlagSettings {
                nats_auth: flags,
                ..FlagSettings::default()
            };
            Settings::resolve(flags, file).map(|s| s.nats.unwrap().auth.login)
        };
        let flag_password = NatsAuthSettings {
            user: Some("flag".into()),
            password: Some(Secret::new("from-flag")),
            ..NatsAuthSettings::default()
        };
        // Flags (and their environment variables) win over the file.
        assert_eq!(
            resolve(
                flag_password.clone(),
                "user = \"file\"\npassword = \"from-file\"\n"
            ),
            Ok(Login::UserPassword {
                user: "flag".into(),
                password: Secret::new("from-flag")
            })
        );
        // A secret directly and as a file at one level: named, not chosen.
        let e = resolve(
            NatsAuthSettings::default(),
            "user = \"u\"\npassword = \"p\"\npassword_file = \"/x\"\n",
        )
        .unwrap_err();
        assert!(e.contains("nats.password and nats.password_file"), "{e}");
        let both = NatsAuthSettings {
            password_file: Some("/x".into()),
            ..flag_password.clone()
        };
        let e = resolve(both, "").unwrap_err();
        assert!(
            e.contains("--nats-password and --nats-password-file"),
            "{e}"
        );
        // Two ways to log in.
        let e = resolve(flag_password, "token = \"t\"\n").unwrap_err();
        assert!(
            e.contains("give one way to log in") && !e.contains("from-flag"),
            "{e}"
        );
        // A user without a password, a password without a user.
        assert!(resolve(NatsAuthSettings::default(), "user = \"u\"\n").is_err());
        assert!(resolve(NatsAuthSettings::default(), "password = \"p\"\n").is_err());
        // The URL's user info is a login, and leaves the URL.
        let file: FileSettings =
            toml::from_str("[nats]\nservers = \"nats://u:p@h:4222\"\n").unwrap();
        let nats = Settings::resolve(FlagSettings::default(), file)
            .unwrap()
            .nats
            .unwrap();
        assert_eq!(nats.servers, "nats://h:4222");
        assert!(matches!(nats.auth.login, Login::UserPassword { .. }));
        assert!(!format!("{nats:?}").contains(":p@") && !format!("{nats:?}").contains("\"p\""));
    }

    #[test]
    fn modes_and_durations_parse() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0999").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("5 fortnights").is_err());
    }
}
