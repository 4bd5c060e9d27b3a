//! The log: stderr (for the journal) or an appended file that SIGHUP
//! reopens, for logrotate. One event per line, with a timestamp.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A log file that can be reopened under the same name.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl LogFile {
    /// Opens (creates) `path` for appending.
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        let file = Self::append(path)?;
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        }))
    }

    fn append(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    /// Reopens the file: after logrotate moved it, logging goes on in a new
    /// file of the old name.
    pub fn reopen(&self) -> io::Result<()> {
        let file = Self::append(&self.path)?;
        *self.file.lock().expect("log file lock") = file;
        Ok(())
    }

    /// A writer for env_logger.
    pub fn writer(self: &Arc<Self>) -> LogWriter {
        LogWriter(self.clone())
    }
}

/// Writes whole records to the current file.
#[derive(Debug)]
pub struct LogWriter(Arc<LogFile>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.file.lock().expect("log file lock").write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.file.lock().expect("log file lock").flush()
    }
}

static TO_FILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the log goes to a file (not to stderr).
pub fn to_file() -> bool {
    TO_FILE.load(std::sync::atomic::Ordering::Relaxed)
}

/// How each log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `[time LEVEL pid target] message`, for people.
    #[default]
    Text,
    /// One JSON object a line: `ts`, `level`, `target`, `pid`, `message`
    /// and the event's fields as keys, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// An event's fields, collected for a JSON line: numbers and booleans as
/// themselves, anything else as its text.
struct Fields(serde_json::Map<String, serde_json::Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let value = if let Some(b) = value.to_bool() {
            serde_json::Value::from(b)
        } else if let Some(n) = value.to_u64() {
            serde_json::Value::from(n)
        } else if let Some(n) = value.to_i64() {
            serde_json::Value::from(n)
        } else if let Some(x) = value.to_f64() {
            serde_json::Value::from(x)
        } else {
            serde_json::Value::from(value.to_string())
        };
        self.0.insert(key.as_str().to_string(), value);
        Ok(())
    }
}

/// One event as a JSON line.
pub fn json_line(ts: &str, pid: u32, record: &log::Record<'_>) -> String {
    let mut fields = Fields(serde_json::Map::new());
    fields.0.insert("ts".into(), ts.into());
    fields
        .0
        .insert("level".into(), record.level().as_str().into());
    fields.0.insert("target".into(), record.target().into());
    fields.0.insert("pid".into(), pid.into());
    fields
        .0
        .insert("message".into(), record.args().to_string().into());
    let _ = record.key_values().visit(&mut fields);
    serde_json::Value::Object(fields.0).to_string()
}

/// Sets up logging: `filter` in RUST_LOG syntax (RUST_LOG itself wins), to
/// `file` or stderr, in `format`. Panics are logged too, so that they reach
/// the file.
pub fn init(
    filter: &str,
    file: Option<&Path>,
    format: LogFormat,
) -> io::Result<Option<Arc<LogFile>>> {
    let mut builder = env_logger::Builder::new();
    // Each line carries the process id: a service and a one-off command
    // (or two services) never read as one another.
    let pid = std::process::id();
    builder
        .parse_filters(filter)
        .parse_env("RUST_LOG")
        .format(move |buf, record| {
            use std::io::Write as _;
            let ts = buf.timestamp_millis();
            match format {
                LogFormat::Text => writeln!(
                    buf,
                    "[{ts} {:<5} {pid} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
                LogFormat::Json => writeln!(buf, "{}", json_line(&ts.to_string(), pid, record)),
            }
        });
    let log_file = match file {
        Some(path) => {
            let log_file = LogFile::open(path)?;
            builder.target(env_logger::Target::Pipe(Box::new(log_file.writer())));
            TO_FILE.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(log_file)
        }
        None => None,
    };
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        log::error!("thread {} {info}", thread.name().unwrap_or("unnamed"));
        if log::max_level() == log::LevelFilter::Off {
            default_hook(info);
        }
    }));
    Ok(log_file)
}
