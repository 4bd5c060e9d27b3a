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

/// Sets up logging: `filter` in RUST_LOG syntax (RUST_LOG itself wins), to
/// `file` or stderr. Panics are logged too, so that they reach the file.
pub fn init(filter: &str, file: Option<&Path>) -> io::Result<Option<Arc<LogFile>>> {
    let mut builder = env_logger::Builder::new();
    // Each line carries the process id: a service and a one-off command
    // (or two services) never read as one another.
    let pid = std::process::id();
    builder
        .parse_filters(filter)
        .parse_env("RUST_LOG")
        .format(move |buf, record| {
            use std::io::Write as _;
            writeln!(
                buf,
                "[{} {:<5} {pid} {}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.target(),
                record.args()
            )
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
