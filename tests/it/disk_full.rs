//! A full disk under the database: SQLite on a small tmpfs, PostgreSQL with
//! its tables in a tablespace on one. `ingest` stops at once with one
//! sentence, nothing is dead-lettered, and the same input run again after
//! space was freed ends in the clean run's state; `serve` waits it out and
//! resumes by itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use normalizer::pipeline::SQLITE_PASS_SIZE;

use crate::chaos::{compare, input};
use crate::pg::PgCluster;
use crate::service::{bin, Server};
use crate::support::{same_as_clean_after_a_rerun, TestDb};
use crate::timeline::{lines_done, watch_metrics};

/// A tmpfs of a few MiB of the test's own, with a ballast file that eats
/// all but a little of it. Unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
    ballast: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SmallDisk {
    fn new(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path()));
        let ballast = dir.path().join("ballast");
        SmallDisk { dir, ballast }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().to_str().unwrap()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }

    /// Fills the disk but for `leave` bytes. A writer racing the ballast
    /// may fill it first: then the disk is full, as asked.
    fn fill_leaving(&self, leave: u64) {
        let size = self.free_bytes().saturating_sub(leave);
        match std::fs::write(&self.ballast, vec![0xA5u8; size as usize]) {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {}
            written => written.unwrap(),
        }
    }

    /// Frees what the ballast took.
    fn free(&self) {
        std::fs::remove_file(&self.ballast).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// A folder seen through a read-only bind mount; unmounted when dropped,
/// also when the test fails.
struct ReadOnlyView(tempfile::TempDir);

impl ReadOnlyView {
    fn of(folder: &Path) -> ReadOnlyView {
        let view = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .arg("--bind")
            .arg(folder)
            .arg(view.path()));
        let view = ReadOnlyView(view);
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(view.0.path()));
        view
    }

    /// The URL of the SQLite database `n.db` seen through it.
    fn url(&self) -> String {
        format!("sqlite://{}", self.0.path().join("n.db").display())
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).output();
    }
}

/// What only reads works on a database that cannot be written.
fn reads_work(url: &str) -> Output {
    let mut status = None;
    for args in [vec!["status", "--json"], vec!["dead-letters", "list"]] {
        let out = bin()
            .args(["--database-url", url])
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} on a read-only database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        status.get_or_insert(out);
    }
    status.unwrap()
}

fn ingest(url: &str, file: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let out = bin()
        .args(["--database-url", url, "ingest"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// An `ingest` that stopped at once (exit 3) with a handful of log lines
/// and the one sentence: what is wrong, where to resume, what to do.
fn stopped_at_once(name: &str, out: &Output, took: Duration, what: &str, remedy: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Log lines; the summary of what was done (a few lines) follows a stop
    // by design.
    let lines = stderr.lines().filter(|l| l.starts_with('[')).count();
    println!(
        "fault={name} stopped_after={:.2}s exit={:?} log_lines={lines}\n{stderr}",
        took.as_secs_f64(),
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("{what}; every line before line "))
            && stderr.contains(&format!("{remedy} and run the same input again")),
        "{stderr}"
    );
    assert!(lines <= 4, "a handful of log lines, not a flood: {stderr}");
    assert!(!stderr.contains("splitting"), "never bisected: {stderr}");
}

/// Runs the case on `url`, prepared by the caller; `free` frees space.
fn check(name: &str, clean: &TestDb, url: &str, text: &str, disk: &SmallDisk) {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    std::fs::write(&file, text).unwrap();
    let (out, took) = ingest(url, &file);
    stopped_at_once(
        &format!("disk-full-{name}"),
        &out,
        took,
        "the database's disk is full",
        "free space",
    );

    disk.free();
    let (out, _) = ingest(url, &file);
    assert!(
        out.status.success(),
        "the rerun after freeing space completes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let faulty = TestDb::open(url, Default::default());
    same_as_clean_after_a_rerun(&clean.snapshot(), &faulty.snapshot());
}

/// [`sqlite_on_a_small_disk`], the disk full but for 512 KiB.
fn sqlite_on_a_full_disk() -> (String, tempfile::TempDir, TestDb, SmallDisk, String) {
    let (text, dir, clean, disk, url) = sqlite_on_a_small_disk(10_000);
    disk.fill_leaving(512 * 1024);
    (text, dir, clean, disk, url)
}

/// An input of `messages`, a clean SQLite run of it (in the folder
/// returned), and a provisioned SQLite file on a small disk (24 MiB for
/// 10,000 messages, more for more).
fn sqlite_on_a_small_disk(
    messages: usize,
) -> (String, tempfile::TempDir, TestDb, SmallDisk, String) {
    let (devices, text) = input(messages);
    let dir = tempfile::tempdir().unwrap();
    let clean = TestDb::open(
        &format!("sqlite://{}", dir.path().join("clean.db").display()),
        Default::default(),
    );
    clean.provision(&devices);
    clean.ingest(&text);
    let disk = SmallDisk::new(24 * messages.div_ceil(10_000) as u32);
    let url = format!("sqlite://{}", disk.path().join("n.db").display());
    TestDb::open(&url, Default::default()).provision(&devices);
    (text, dir, clean, disk, url)
}

#[test]
fn a_full_sqlite_disk_stops_ingest_at_once_and_a_rerun_after_freeing_space_completes() {
    let (text, _dir, clean, disk, url) = sqlite_on_a_full_disk();
    check("sqlite", &clean, &url, &text, &disk);
}

#[test]
fn a_full_postgres_tablespace_stops_ingest_at_once_and_a_rerun_after_freeing_space_completes() {
    let (devices, text) = input(10_000);
    let cluster = PgCluster::start_new();
    let clean = TestDb::open(&cluster.create_database(), Default::default());
    clean.provision(&devices);
    clean.ingest(&text);

    let disk = SmallDisk::new(24);
    let location = disk.path().join("tablespace");
    std::fs::create_dir(&location).unwrap();
    run(Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&location));
    let url = cluster.create_database();
    let database = url.rsplit('/').next().unwrap();
    let mut admin = cluster.admin();
    admin
        .batch_execute(&format!(
            "CREATE TABLESPACE small LOCATION '{}'",
            location.display()
        ))
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {database} SET default_tablespace = small"
        ))
        .unwrap();
    {
        let faulty = TestDb::open(&url, Default::default());
        faulty.provision(&devices);
    }
    disk.fill_leaving(1024 * 1024);
    check("postgres", &clean, &url, &text, &disk);
}

#[test]
fn serve_waits_out_a_full_disk_and_resumes_when_space_is_freed() {
    // CHAOS_MESSAGES (10,000 unless set; scripts/chaos draws this run), at
    // least 50,000; and with group commits (serve's default on SQLite: one
    // pass), four groups, so that three are still to come when the disk fills after the
    // first commit: the next may still fit in the space of the log file
    // (SQLite writes its WAL again from the start after a checkpoint, and a
    // checkpoint that cannot grow the database file fails unseen), the one
    // after it cannot.
    let messages = match crate::support::options().batch_size {
        1 => crate::chaos::sqlite_size(),
        _ => crate::chaos::sqlite_size().max(4 * SQLITE_PASS_SIZE),
    };
    let (text, _dir, clean, disk, url) = sqlite_on_a_small_disk(messages);
    let messages = text.lines().count();
    let how = format!(
        "serve on SQLite, its disk filled once the first transaction committed, space freed {} s after it was felt",
        HOLD.as_secs()
    );
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    std::fs::write(&file, &text).unwrap();
    let metrics = format!("127.0.0.1:{}", crate::pg::free_port());
    let server = Server::start(work.path(), &url, &["--metrics-listen", &metrics]);
    let started = Instant::now();
    let watching = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_metrics(&metrics, &watching, started));
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_out_a_full_disk(&server, &metrics, work.path(), &file, &disk)
        }));
        watching.store(true, Ordering::SeqCst);
        let timeline = watcher.join().expect("the watcher does not panic");
        let (full, freed) = waited.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        if let Some(dir) = crate::timeline::dir() {
            let mut timeline = timeline;
            timeline.mark(full, "disk full felt");
            timeline.mark(freed, "space freed");
            timeline.write(&dir, "disk-full-serve", Some(full), Some(freed), &how);
        }
    });
    server.signal(libc::SIGTERM);
    let out = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = work.path().join("normalizer.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "{}",
        text.lines()
            .filter(|l| l.contains("disk"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        text.matches("the database's disk is full since").count(),
        1,
        "said once: {text}"
    );
    assert_eq!(
        text.matches("the database's disk has space again").count(),
        1,
        "said once: {text}"
    );
    let faulty = TestDb::open(&url, Default::default());
    let (clean_snap, faulty_snap) = (clean.snapshot(), faulty.snapshot());
    let (lost, doubled, wrong) = compare(&clean_snap, &faulty_snap);
    println!(
        "fault=disk-full-serve messages={messages} lost={lost} doubled={doubled} wrongly_dead_lettered={wrong} how=\"{how}\""
    );
    assert_eq!((lost, doubled, wrong), (0, 0, 0));
    assert_eq!(faulty_snap, clean_snap, "end state equals the clean run");
}

/// How long `serve` is left on the full disk before space is freed.
const HOLD: Duration = Duration::from_secs(5);

/// Sends `file` to `server`, fills the disk once the
/// first of them are done (by its metrics at `metrics`), waits until the full disk
/// is felt, holds it full for [`HOLD`] (`send` must still be waiting),
/// frees the space and waits until every line is acknowledged. Returns
/// when the full disk was felt and when space was freed.
fn wait_out_a_full_disk(
    server: &Server,
    metrics: &str,
    work: &Path,
    file: &Path,
    disk: &SmallDisk,
) -> (Instant, Instant) {
    let log = work.join("normalizer.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut send = bin()
        .args(["send", "--socket"])
        .arg(&server.socket)
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines_done(metrics) < 1.0 {
        assert!(Instant::now() < deadline, "the first lines done");
        std::thread::sleep(Duration::from_millis(20));
    }
    disk.fill_leaving(256 * 1024);
    while !read_log().contains("the database's disk is full since") {
        assert!(
            Instant::now() < deadline,
            "the full disk was felt: {}",
            read_log()
        );
        assert!(send.try_wait().unwrap().is_none(), "send waits");
        std::thread::sleep(Duration::from_millis(50));
    }
    let full = Instant::now();
    // Waiting, not exiting, and not dead-lettering.
    std::thread::sleep(HOLD);
    assert!(send.try_wait().unwrap().is_none(), "send still waits");
    disk.free();
    let freed = Instant::now();
    let sent = send.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "every line acknowledged after space was freed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    (full, freed)
}

/// A database that cannot be written (here: seen through a read-only bind
/// mount while a writer holds it open elsewhere) is not the messages' fault
/// either: `ingest` stops at once with one sentence, nothing is bisected or
/// dead-lettered, and the same input completes where it is writable.
#[test]
fn a_read_only_sqlite_database_stops_ingest_at_once_and_a_rerun_after_fixing_it_completes() {
    let (devices, text) = input(2_000);
    let disk = SmallDisk::new(24);
    let writable = format!("sqlite://{}", disk.path().join("n.db").display());
    // Held open: its -wal and -shm stay, as under a running service.
    let holder = TestDb::open(&writable, Default::default());
    holder.provision(&devices);
    let bound = ReadOnlyView::of(disk.path());
    let read_only = bound.url();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    std::fs::write(&file, &text).unwrap();
    let (out, took) = ingest(&read_only, &file);
    reads_work(&read_only);
    drop(bound);
    stopped_at_once(
        "read-only-sqlite",
        &out,
        took,
        "the database is read-only",
        "make it writable",
    );
    assert_eq!(
        holder.status().dead_letters.len(),
        0,
        "nothing dead-lettered"
    );
    let (out, _) = ingest(&writable, &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = crate::support::sqlite();
    clean.provision(&devices);
    clean.ingest(&text);
    same_as_clean_after_a_rerun(&clean.snapshot(), &holder.snapshot());
}

/// A SQLite database closed cleanly (no `-wal` or `-shm` beside it, no
/// writer anywhere) on a read-only file system: SQLite cannot open a WAL
/// database there the usual way. `status` and `dead-letters list` read it
/// all the same (opened immutable), and `ingest` stops at once as on any
/// database that cannot be written.
#[test]
fn a_cleanly_closed_sqlite_database_on_a_read_only_mount_is_read_and_never_written() {
    let (devices, text) = input(500);
    let stored = tempfile::tempdir().unwrap();
    let writable = format!("sqlite://{}", stored.path().join("n.db").display());
    {
        let db = TestDb::open(&writable, Default::default());
        db.provision(&devices);
        db.ingest(&text);
    }
    let leftovers: Vec<_> = std::fs::read_dir(stored.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "n.db")
        .collect();
    assert!(leftovers.is_empty(), "closed cleanly: {leftovers:?}");
    let view = ReadOnlyView::of(stored.path());
    let read_only = view.url();
    let status = reads_work(&read_only);
    let clean = crate::support::sqlite();
    clean.provision(&devices);
    clean.ingest(&text);
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        shown["dead_letters"].as_array().map(Vec::len),
        Some(clean.status().dead_letters.len()),
        "{shown}"
    );
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    std::fs::write(&file, &text).unwrap();
    let (out, took) = ingest(&read_only, &file);
    stopped_at_once(
        "read-only-mount-sqlite",
        &out,
        took,
        "the database is read-only",
        "make it writable",
    );
}
