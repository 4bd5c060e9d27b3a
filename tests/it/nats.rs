//! The NATS JetStream feed on real nats-server clusters that the tests start
//! with `scripts/nats-cluster` (3 nodes on free loopback ports, never the
//! machine's own server), with `serve` instances as real processes.
//!
//! `NATS_MESSAGES` sets the size of the scale-out run (default 200,000).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::PgConnection;
use normalizer::db::repo::snapshot::Snapshot;
use normalizer::db::PoolSettings;

use crate::chaos;
use crate::pg::PgCluster;
use crate::service::{bin, wait_until_serving};
use crate::support::TestDb;
use crate::timeline::Timeline;

fn scale_out_size() -> usize {
    std::env::var("NATS_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

/// A 3-node cluster of the test's own, stopped and removed on drop.
pub(crate) struct NatsCluster {
    dir: PathBuf,
    pub(crate) urls: String,
    pub(crate) mqtt_port: u16,
}

fn script() -> Command {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nats-cluster"))
}

impl NatsCluster {
    pub(crate) fn start() -> NatsCluster {
        Self::start_with(&[])
    }

    /// A cluster with TLS on every port and users with the least privilege
    /// of scripts/nats/permissions.conf (`nats-cluster start --secure`).
    pub(crate) fn start_secure() -> NatsCluster {
        Self::start_with(&["--secure"])
    }

    /// The flags that log `user` (normalizer or producer) in to a secure
    /// cluster: its password from the file the cluster wrote, its CA.
    pub(crate) fn login(&self, user: &str) -> Vec<String> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        vec![
            "--nats-user".into(),
            user.into(),
            "--nats-password-file".into(),
            file(&format!("{user}.password")),
            "--nats-ca".into(),
            file("ca.crt"),
        ]
    }

    fn start_with(flags: &[&str]) -> NatsCluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/tmp/normalizer-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = NatsCluster {
            urls: String::new(),
            mqtt_port: 0,
            dir,
        };
        let out = script()
            .arg("start")
            .args(flags)
            .arg(&cluster.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/nats-cluster start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |name: &str| {
            std::fs::read_to_string(cluster.dir.join(name))
                .unwrap()
                .trim()
                .to_string()
        };
        cluster.urls = read("urls");
        cluster.mqtt_port = read("mqtt-port").parse().unwrap();
        cluster
    }

    /// Starts whichever node is not running (same ports, same data).
    pub(crate) fn start_missing(&self) {
        let out = script().arg("start").arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/nats-cluster start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILLs node `n` (1 to 3) and waits until it is gone.
    pub(crate) fn kill(&self, n: usize) {
        let pid: i32 = std::fs::read_to_string(self.dir.join(format!("node{n}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: signalling a server process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: as above; signal 0 only asks whether it exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node (1 to 3) that leads `stream` now.
    pub(crate) fn leader(&self, stream: &str) -> usize {
        with_jetstream(&self.urls, async |js| {
            let mut stream = js.get_stream(stream).await.unwrap();
            let info = stream.info().await.unwrap();
            let leader = info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .unwrap();
            leader.trim_start_matches('n').parse().unwrap()
        })
    }

    /// The node (1 to 3) that each consumer of `stream` lives on, by name.
    pub(crate) fn consumer_nodes(&self, stream: &str) -> Vec<(String, usize)> {
        with_jetstream(&self.urls, async |js| {
            use futures_util::StreamExt;
            let stream = js.get_stream(stream).await.unwrap();
            let mut consumers = stream.consumers();
            let mut nodes = Vec::new();
            while let Some(info) = consumers.next().await {
                let info = info.unwrap();
                let leader = info.cluster.and_then(|c| c.leader).unwrap_or_default();
                if let Ok(node) = leader.trim_start_matches('n').parse() {
                    nodes.push((info.name, node));
                }
            }
            nodes
        })
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        let _ = script().arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `serve` process (`--nats`, or any source).
pub(crate) struct Instance {
    child: Child,
    log: PathBuf,
}

impl Instance {
    /// Starts one on NATS and returns once it serves.
    fn start(dir: &Path, label: &str, db: &str, urls: &str, extra: &[&str]) -> Instance {
        Self::serve(dir, label, db, &[&["--nats", urls][..], extra].concat())
    }

    /// Starts `serve ARGS` and returns once it serves; its log is
    /// `<dir>/<label>.log`.
    pub(crate) fn serve(dir: &Path, label: &str, db: &str, args: &[&str]) -> Instance {
        let log = dir.join(format!("{label}.log"));
        let _ = std::fs::remove_file(&log);
        let child = bin()
            .args(["--database-url", db, "--log-file"])
            .arg(&log)
            .args(["serve", "--stats-interval", "2s"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let child = wait_until_serving(child, || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("serving on")
        });
        Instance { child, log }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its name in the ownership bucket, from its first log line.
    fn name(&self) -> String {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("serving on")).unwrap();
        let after = line.split(" as ").nth(1).unwrap();
        after.split_whitespace().next().unwrap().to_string()
    }

    pub(crate) fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// SIGTERM, and its exit.
    pub(crate) fn stop(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Instance {
    /// Kills it if it still runs; a failing test prints the end of its log
    /// first (the log's directory goes with the test).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- the last lines of {}:\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Three `serve` instances (`<label>0` to `<label>2`), once each owns
/// partitions.
fn three_instances(
    dir: &Path,
    label: &str,
    url: &str,
    urls: &str,
    extra: &[&str],
) -> Vec<Instance> {
    let instances: Vec<Instance> = (0..3)
        .map(|k| Instance::start(dir, &format!("{label}{k}"), url, urls, extra))
        .collect();
    wait_until(
        "every instance owning partitions",
        Duration::from_secs(60),
        || {
            instances
                .iter()
                .all(|i| i.log().contains("owning partition"))
        },
    );
    instances
}

/// Lines with an outcome in the database: processed ids and dead letters.
pub(crate) fn done(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM processed_messages) + (SELECT count(*) FROM dead_letters) AS n",
    )
    .get_result::<N>(conn)
    .expect("the lines done are counted")
    .n
}

/// Server sessions waiting for a lock whose client is on one of `ports`.
fn lock_waiters(conn: &mut PgConnection, ports: &[u16]) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND client_port = ANY($1)",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(ports)
    .get_result::<N>(conn)
    .map(|r| r.n)
    .unwrap_or(0)
}

/// The local TCP ports of process `pid`'s sockets (its database
/// connections among them): its socket inodes, looked up in the
/// namespace's TCP tables.
fn local_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
                    Some(inode.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            if inodes.contains(*inode) {
                if let Some(port) = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

/// The owners of the fences, by partition key.
fn fence_owners(conn: &mut PgConnection) -> Vec<(String, String)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        partition_key: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        owner: String,
    }
    diesel::sql_query("SELECT partition_key, owner FROM feed_fences ORDER BY partition_key")
        .load::<Row>(conn)
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.partition_key, r.owner))
        .collect()
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long the lines done may stay the same before a wait for them fails.
/// Longer than any pause a test causes on purpose (a takeover after a lease,
/// a breaker closing, a cluster coming back), and no bound on the whole run:
/// a loaded machine may go slowly (four tests at once on two CPUs, one
/// message per transaction, a debug build), a feed that stopped may not.
const STALL: Duration = Duration::from_secs(90);

/// Waits until `count` reaches `target`, failing only when it has not grown
/// for `STALL`. Returns how long it took.
pub(crate) fn wait_for_lines(what: &str, target: i64, mut count: impl FnMut() -> i64) -> Duration {
    let started = Instant::now();
    let mut last = count();
    let mut moved = Instant::now();
    while last < target {
        std::thread::sleep(Duration::from_millis(100));
        let now = count();
        if now > last {
            last = now;
            moved = Instant::now();
        }
        assert!(
            moved.elapsed() < STALL,
            "waiting for {what}: {last} of {target} lines done, none more for {STALL:?}"
        );
    }
    started.elapsed()
}

/// `send --nats` of a file, in the background.
fn send(urls: &str, file: &Path) -> std::thread::JoinHandle<Output> {
    send_as(urls, &[], file)
}

/// `send --nats` of a file with `login`, in the background.
fn send_as(urls: &str, login: &[String], file: &Path) -> std::thread::JoinHandle<Output> {
    let mut command = bin();
    command.args(["send", "--nats", urls]).args(login).arg(file);
    std::thread::spawn(move || command.output().unwrap())
}

/// `send --nats` of a file, which must store every line.
fn publish(urls: &str, file: &Path) {
    let sent = send(urls, file).join().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
}

/// `input`'s first and second half, as two files in `dir`.
fn write_halves(dir: &Path, input: &str) -> [PathBuf; 2] {
    let lines: Vec<&str> = input.lines().collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    let halves = [dir.join("first.jsonl"), dir.join("second.jsonl")];
    for (path, part) in halves.iter().zip([first, second]) {
        std::fs::write(path, part.join("\n") + "\n").unwrap();
    }
    halves
}

/// What every feed test starts from: generated input, its clean reference
/// (one `ingest` into a database of its own), an empty provisioned database
/// for the feed, a NATS cluster, and the input as a file.
struct Scene {
    input: String,
    clean: Snapshot,
    /// Lines with an outcome in the clean run.
    total: i64,
    ingest_took: Duration,
    url: String,
    conn: PgConnection,
    nats: NatsCluster,
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Scene {
    fn new(pg: &PgCluster, messages: usize) -> Scene {
        Self::on(pg, messages, NatsCluster::start())
    }

    fn on(pg: &PgCluster, messages: usize, nats: NatsCluster) -> Scene {
        let (provisioning, input) = chaos::input(messages);
        let reference = TestDb::open(&pg.create_database(), PoolSettings::default());
        reference.provision(&provisioning);
        let started = Instant::now();
        reference.ingest(&input);
        let ingest_took = started.elapsed();
        let clean = reference.snapshot();
        let total = (clean.processed.len() + clean.dead_letters.len()) as i64;
        let url = pg.create_database();
        TestDb::open(&url, PoolSettings::default()).provision(&provisioning);
        let conn = PgConnection::establish(&url).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("messages.jsonl");
        std::fs::write(&file, &input).unwrap();
        Scene {
            input,
            clean,
            total,
            ingest_took,
            url,
            conn,
            nats,
            dir,
            file,
        }
    }
}

pub(crate) fn assert_exact(clean: &Snapshot, faulty: &Snapshot) -> (usize, usize, usize) {
    let figures = chaos::compare(clean, faulty);
    assert_eq!(figures, (0, 0, 0), "lost, doubled, wrongly dead-lettered");
    assert_eq!(faulty.readings, clean.readings, "the same readings");
    assert_eq!(
        faulty.alerts, clean.alerts,
        "the same alerts, in the same order"
    );
    assert_eq!(faulty.processed, clean.processed);
    assert_eq!(faulty.dead_letters, clean.dead_letters);
    assert_eq!(faulty.devices, clean.devices);
    figures
}

#[test]
fn three_instances_under_kills_end_exactly_as_one_clean_ingest() {
    let messages = scale_out_size();
    let pg = PgCluster::start_new();
    let Scene {
        clean,
        total,
        ingest_took,
        url,
        mut conn,
        nats,
        dir,
        file,
        ..
    } = Scene::new(&pg, messages);
    let extra = ["--nats-replicas", "3"];
    let mut instances = three_instances(dir.path(), "i", &url, &nats.urls, &extra);
    let victim = instances[0].name();

    let started = Instant::now();
    let mut timeline = Timeline::new(
        started,
        "backends_killed_so_far",
        "a_node_or_an_instance_down",
    );
    let (mut node_back, mut back_at) = (None, None);
    let sender = send(&nats.urls, &file);
    let mut leader_killed = None;
    let mut instance_killed = None;
    let mut takeover = None;
    let mut backends_killed = 0;
    let mut last_backend_kill = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let now = done(&mut conn);
        if now >= total {
            break;
        }
        if now > last {
            (last, moved) = (now, Instant::now());
        }
        assert!(
            moved.elapsed() < STALL,
            "{last} of {total} lines done, none more for {STALL:?}"
        );
        let share = now as f64 / total as f64;
        if leader_killed.is_none() && share >= 0.1 {
            let leader = nats.leader("normalizer");
            nats.kill(leader);
            leader_killed = Some((leader, Instant::now()));
            timeline.mark(
                Instant::now(),
                &format!("stream leader's NATS node {leader} killed"),
            );
        }
        if let Some((n, at)) = leader_killed {
            if at.elapsed() > Duration::from_secs(5) {
                nats.start_missing();
                if node_back.is_none() {
                    node_back = Some(Instant::now());
                    timeline.mark(Instant::now(), &format!("NATS node {n} back"));
                }
            }
        }
        if instance_killed.is_none() && share >= 0.3 {
            instances[0].signal(libc::SIGKILL);
            instance_killed = Some(Instant::now());
            timeline.mark(Instant::now(), "instance i0 killed");
        }
        if let (Some(at), None) = (instance_killed, takeover) {
            let owners = fence_owners(&mut conn);
            if !owners.iter().any(|(_, owner)| *owner == victim) {
                takeover = Some(at.elapsed());
                timeline.mark(Instant::now(), "its partitions taken over");
            }
        }
        if back_at.is_none() && share >= 0.6 && takeover.is_some() {
            instances[0] = Instance::start(dir.path(), "i0-again", &url, &nats.urls, &extra);
            back_at = Some(Instant::now());
            timeline.mark(Instant::now(), "i0 back");
        }
        if last_backend_kill.elapsed() > Duration::from_secs(3) {
            backends_killed += pg.terminate_normalizer_backends(&url);
            last_backend_kill = Instant::now();
        }
        let node_down = leader_killed.is_some() && node_back.is_none();
        let instance_down = instance_killed.is_some() && back_at.is_none();
        timeline.sample(
            now as u64,
            backends_killed as u64,
            node_down || instance_down,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(dir) = crate::timeline::dir() {
        timeline.write(
            &dir,
            "scale-out",
            leader_killed.map(|(_, at)| at),
            back_at,
            &format!("3 instances, stream R3, {messages} messages; its backends killed every 3 s"),
        );
    }
    let took = started.elapsed();
    // The faults are the test: each must have happened (a run too small
    // to reach them fails here rather than passing without them).
    assert!(
        leader_killed.is_some(),
        "the stream leader's node was killed (at 10 %)"
    );
    assert!(
        instance_killed.is_some(),
        "an instance was killed (at 30 %)"
    );
    assert!(
        takeover.is_some(),
        "its partitions were taken over while lines remained"
    );
    assert!(back_at.is_some(), "it came back (at 60 %)");
    assert!(backends_killed > 0, "backends were killed");
    nats.start_missing();
    let sent = sender.join().unwrap();
    assert!(
        sent.status.success(),
        "send --nats: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        String::from_utf8_lossy(&sent.stdout).contains(&format!("published {messages},")),
        "{}",
        String::from_utf8_lossy(&sent.stdout)
    );
    wait_until(
        "the restarted instance getting its share again",
        Duration::from_secs(60),
        || instances[0].log().contains("owning partition"),
    );
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    let (lost, doubled, wrong) = assert_exact(&clean, &faulty);
    for instance in instances {
        let (status, log) = instance.stop();
        assert!(status.success(), "{status}: {log}");
    }
    println!(
        "fault=scale-out messages={messages} lost={lost} doubled={doubled} wrongly_dead_lettered={wrong} how=\"3 instances, stream R3; nats node {} killed at 10 %, instance killed at 30 % and back at 60 %, {backends_killed} backends killed; takeover after the kill {:.1} s; run {:.1} s (clean ingest {:.1} s)\"",
        leader_killed.map_or(0, |(n, _)| n),
        takeover.map_or(f64::NAN, |t| t.as_secs_f64()),
        took.as_secs_f64(),
        ingest_took.as_secs_f64(),
    );
}

#[test]
fn a_frozen_owner_commits_nothing_for_the_partitions_it_lost() {
    let Scene {
        clean,
        total,
        url,
        mut conn,
        nats,
        dir,
        file,
        ..
    } = Scene::new(crate::pg::shared(), 20_000);

    let mut extra = vec!["--nats-lease", "3s"];
    if std::env::var_os("NATS_DEBUG").is_some() {
        extra.extend(["--log-level", "debug"]);
    }
    let frozen = Instance::start(dir.path(), "frozen", &url, &nats.urls, &extra);
    let other = Instance::start(dir.path(), "other", &url, &nats.urls, &extra);
    let (frozen_name, other_name) = (frozen.name(), other.name());
    wait_until(
        "both instances owning partitions",
        Duration::from_secs(60),
        || {
            let owners = fence_owners(&mut conn);
            owners.len() == 16
                && owners.iter().any(|(_, o)| *o == frozen_name)
                && owners.iter().any(|(_, o)| *o == other_name)
        },
    );
    // Balancing reads the ownership bucket without creating consumers (each
    // would be two proposals to the meta layer): about ten balancing rounds
    // (two instances, one every 0.6 s with a 3 s lease), none may create one.
    let created = consumers_created(&nats.urls, "KV_normalizer-owners", Duration::from_secs(3));
    assert_eq!(
        created, 0,
        "consumers created on the ownership bucket in 3 s"
    );
    // Frozen mid-transaction, for certain: every device row is locked here
    // before the messages are sent, so that the workers wait on a lock with
    // their first batches in flight; the instance is frozen once one of its
    // own sessions waits; then the locks are released. Its backend takes
    // its locks and waits for a client that does not answer, until the
    // server ends it after the lease.
    let mut locker = PgConnection::establish(&url).unwrap();
    locker
        .batch_execute("BEGIN; SELECT id FROM devices FOR UPDATE")
        .unwrap();
    publish(&nats.urls, &file);
    wait_until(
        "a worker of the instance to freeze waiting on the device locks",
        Duration::from_secs(60),
        || lock_waiters(&mut conn, &local_ports(frozen.child.id())) > 0,
    );
    frozen.signal(libc::SIGSTOP);
    locker.batch_execute("COMMIT").unwrap();
    wait_until(
        "the other instance owning every partition",
        Duration::from_secs(60),
        || {
            let owners = fence_owners(&mut conn);
            owners.len() == 16 && owners.iter().all(|(_, o)| *o == other_name)
        },
    );
    let taken_at = done(&mut conn);
    let more = (taken_at + total / 10).min(total);
    let alone = wait_for_lines("more work done by the other", more, || done(&mut conn));
    frozen.signal(libc::SIGCONT);
    wait_for_lines("every line", total, || done(&mut conn));
    // The frozen one learns it lost its partitions, and gets a share back.
    wait_until(
        "the resumed instance saying it lost its partitions",
        Duration::from_secs(30),
        || frozen.log().contains("lost partition"),
    );
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_exact(&clean, &faulty);
    let lost_lines = frozen
        .log()
        .lines()
        .filter(|l| l.contains("lost partition"))
        .count();
    let (status, frozen_log) = frozen.stop();
    if std::env::var_os("NATS_DEBUG").is_some() {
        println!("{frozen_log}");
    }
    assert!(status.success(), "{status}: {frozen_log}");
    let (status, log) = other.stop();
    assert!(status.success(), "{status}: {log}");
    let fenced: u64 = frozen_log
        .lines()
        .find_map(|l| {
            let rest = l.split("nats: ").nth(1)?;
            let (n, text) = rest.split_once(' ')?;
            text.starts_with("messages ended at a fence")
                .then(|| n.parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    assert!(
        fenced > 0,
        "the frozen owner had work in flight that its fence stopped: {frozen_log}"
    );
    println!(
        "nats fencing: an owner frozen past its 3 s lease, its partitions taken over, the other did {} lines alone in {:.1} s; after SIGCONT it logged {lost_lines} lost partitions and {fenced} messages ended at a fence; end state exact",
        more - taken_at,
        alone.as_secs_f64()
    );
}

/// The partitions' consumers have one replica, in memory: the node that
/// holds most of them dies and stays down, and their partitions are taken
/// again with new consumers on the other two nodes, which start after the
/// resume points the owner recorded in the database (the dead consumers'
/// ack floors cannot be read). The first half is applied and recorded
/// before the kill, the second half published after it. Nothing lost,
/// nothing doubled.
#[test]
fn partitions_whose_consumers_die_with_their_node_are_taken_again_from_the_database() {
    let Scene {
        input,
        clean,
        total,
        url,
        mut conn,
        nats,
        dir,
        ..
    } = Scene::new(crate::pg::shared(), 10_000);
    let halves = write_halves(dir.path(), &input);
    let extra = ["--nats-replicas", "3"];
    let instance = Instance::start(dir.path(), "survivor", &url, &nats.urls, &extra);
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let recorded = |conn: &mut PgConnection| {
        diesel::sql_query("SELECT count(*) AS n FROM feed_fences WHERE resume_after > 0")
            .get_result::<N>(conn)
            .unwrap()
            .n
    };
    publish(&nats.urls, &halves[0]);
    // The first half's outcomes, from an ingest of it alone.
    let half = {
        let (provisioning, _) = chaos::input(10_000);
        let reference = TestDb::open(
            &crate::pg::shared().create_database(),
            PoolSettings::default(),
        );
        reference.provision(&provisioning);
        reference.ingest(&std::fs::read_to_string(&halves[0]).unwrap());
        let snapshot = reference.snapshot();
        (snapshot.processed.len() + snapshot.dead_letters.len()) as i64
    };
    wait_for_lines("the first half", half, || done(&mut conn));
    // Each partition's settled point goes into its fence row within an
    // ownership tick or so.
    wait_until(
        "every partition's resume point recorded",
        Duration::from_secs(30),
        || recorded(&mut conn) == 16,
    );
    let before = nats.consumer_nodes("normalizer");
    let victim = (1..=3)
        .max_by_key(|k| before.iter().filter(|(_, n)| n == k).count())
        .unwrap();
    let dead: Vec<&str> = before
        .iter()
        .filter(|(_, n)| *n == victim)
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(!dead.is_empty(), "{before:?}");
    nats.kill(victim);
    publish(&nats.urls, &halves[1]);
    let took = wait_for_lines("every line", total, || done(&mut conn));
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_exact(&clean, &faulty);
    let log = instance.log();
    assert!(
        log.contains("its consumer has not answered") || log.contains("its consumer is gone"),
        "{log}"
    );
    // The dead consumers' partitions run on new consumers, each made to
    // start after its partition's recorded resume point.
    let partition = |name: &str| name.split('-').next().unwrap().to_string();
    let starts = with_jetstream(&nats.urls, async |js| {
        use futures_util::StreamExt;
        let stream = js.get_stream("normalizer").await.unwrap();
        let mut consumers = stream.consumers();
        let mut starts = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            starts.push((info.name, info.config.deliver_policy));
        }
        starts
    });
    for name in &dead {
        let (new, policy) = starts
            .iter()
            .find(|(n, _)| partition(n) == partition(name) && n != name)
            .unwrap_or_else(|| panic!("no new consumer for {name}: {starts:?}"));
        assert!(
            matches!(
                policy,
                async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence }
                    if *start_sequence > 1
            ),
            "{new}: {policy:?}"
        );
    }
    nats.start_missing();
    let (status, log) = instance.stop();
    if std::env::var_os("NATS_DEBUG").is_some() {
        println!("{log}");
    }
    assert!(status.success(), "{status}: {log}");
    println!(
        "nats consumer node: node {victim} killed with {} of {} consumers, half the lines applied and recorded; the second half published after, done {:.1} s later, exact; the new consumers started after the recorded resume points",
        dead.len(),
        before.len(),
        took.as_secs_f64()
    );
}

/// A stop cancels the balancing round under way, whose `create` of a
/// partition key may have landed unrecorded: at the end the instance gives
/// up every key with its name, else that partition would wait for the
/// lease to run out before anyone took it. Stopped as soon as it serves,
/// each instance is most likely mid-round.
#[test]
fn an_instance_stopped_while_it_claims_leaves_no_key_behind() {
    let Scene { url, nats, dir, .. } = Scene::new(crate::pg::shared(), 100);
    for round in 0..5 {
        let instance = Instance::start(dir.path(), &format!("r{round}"), &url, &nats.urls, &[]);
        let name = instance.name();
        let (status, log) = instance.stop();
        assert!(status.success(), "{status}: {log}");
        let left = keys_holding(&nats.urls, &name);
        assert!(
            left.is_empty(),
            "round {round}: {name} stopped and left {left:?}: {log}"
        );
    }
}

#[test]
fn mqtt_sensors_publish_at_qos_1_and_are_normalized() {
    let Scene {
        input,
        clean,
        total,
        url,
        mut conn,
        nats,
        dir,
        ..
    } = Scene::new(crate::pg::shared(), 1_000);
    let instance = Instance::start(dir.path(), "mqtt", &url, &nats.urls, &[]);
    // One publisher per device, on topic sensors/<device key>, its lines in
    // order (a device's own order is what the partitions keep).
    let mut by_device: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let device = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("device").and_then(|d| d.as_str().map(str::to_string)))
            .filter(|d| !d.is_empty() && !d.contains(['/', '+', '#', ' ', '.']))
            .unwrap_or_else(|| "unreadable".to_string());
        by_device.entry(device).or_default().push(line);
    }
    for (device, lines) in &by_device {
        let mut publisher = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &nats.mqtt_port.to_string()])
            .args(["-q", "1", "-l", "-i", &format!("sensor-{device}")])
            .args(["-t", &format!("sensors/{device}")])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (Debian's mosquitto-clients) runs");
        {
            use std::io::Write;
            let mut stdin = publisher.stdin.take().unwrap();
            for line in lines {
                writeln!(stdin, "{line}").unwrap();
            }
        }
        assert!(
            publisher.wait().unwrap().success(),
            "mosquitto_pub {device}"
        );
    }
    wait_for_lines("every MQTT message", total, || done(&mut conn));
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_eq!(faulty.processed, clean.processed);
    assert_eq!(faulty.readings, clean.readings);
    assert_eq!(faulty.alerts, clean.alerts);
    // Device keys of two to four topic levels route too (the mapping's
    // other rules): unprovisioned, each becomes an unknown-device dead
    // letter under its own key.
    let keys = ["hall/a", "hall/b/c", "hall/b/c/d"];
    for key in keys {
        let line = format!(
            r#"{{"id":"mqtt-{key}","device":"{key}","ts":"2026-01-01T00:00:00Z","payload":{{"t":1}}}}"#
        );
        let published = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &nats.mqtt_port.to_string()])
            .args(["-q", "1", "-t", &format!("sensors/{key}"), "-m", &line])
            .status()
            .unwrap();
        assert!(published.success(), "mosquitto_pub sensors/{key}");
    }
    wait_for_lines("the multi-level topics", total + keys.len() as i64, || {
        done(&mut conn)
    });
    #[derive(QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        device_key: String,
    }
    let dead: Vec<String> = diesel::sql_query(
        "SELECT device_key FROM dead_letters WHERE kind = 'unknown_device' AND device_key LIKE 'hall/%' ORDER BY device_key",
    )
    .load::<Key>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|k| k.device_key)
    .collect();
    assert_eq!(dead, keys);
    let (status, log) = instance.stop();
    assert!(status.success(), "{log}");
}

/// The fence on its own, on both backends: a job of a partition whose token
/// is no longer the stored one commits nothing and ends as `Fenced`; a job
/// of the current owner commits, and a redelivered one (same write token)
/// changes nothing. The resume point goes with the fence: recorded only
/// under the stored token and never downwards, returned by the next claim.
#[test]
fn a_job_behind_a_raised_fence_commits_nothing_on_both_backends() {
    use normalizer::db::repo::fences::{self, Fence};
    use normalizer::db::Failure;
    use normalizer::input::Line;
    use normalizer::outcome::Outcome;
    use normalizer::pipeline::{Origin, Workers};
    use std::sync::atomic::AtomicBool;

    for t in crate::support::both() {
        t.provision(crate::support::DEVICES);
        let key: std::sync::Arc<str> = "normalizer/3".into();
        let old = Fence {
            key: key.clone(),
            token: 7,
        };
        let new = Fence { key, token: 9 };
        // The stream's creation time: a stream made again under the same
        // name counts its sequences from 1.
        let stream = 1_700_000_000_000_000_000;
        let claim_in = |fence: &Fence, owner: &str, stream: i64| {
            t.db.transaction(|c| fences::claim(c, fence, owner, stream))
                .unwrap()
        };
        let claim = |fence: &Fence, owner: &str| claim_in(fence, owner, stream);
        let record_in = |fence: &Fence, stream: i64, through: u64| {
            t.db.transaction(|c| fences::record(c, fence, stream, through))
                .unwrap()
        };
        let record = |fence: &Fence, through: u64| record_in(fence, stream, through);
        assert_eq!(claim(&old, "a"), Some(0), "a new fence has nothing settled");
        assert!(record(&old, 5));
        assert!(!record(&old, 3), "the resume point never goes down");
        // Each (id, delivery token) as its own line; the results of all of
        // them (one batch).
        let run_all = |lines: &[(&str, &str)], fence: &Fence| {
            let stop = AtomicBool::new(false);
            let (reply, replies) = crossbeam_channel::unbounded();
            let options = normalizer::pipeline::IngestOptions {
                workers: 1,
                batch_wait: std::time::Duration::from_millis(200),
                ..crate::support::options()
            };
            std::thread::scope(|s| {
                let workers = Workers::spawn(s, &t.db, &options, &stop);
                for (i, (id, token)) in lines.iter().enumerate() {
                    let ts = format!("2026-11-29T10:00:{:02}Z", id[2..].parse::<u32>().unwrap());
                    let line = crate::support::msg(id, "dev-0042", &ts, r#"{"t":21.5}"#);
                    let origin = Origin {
                        token: token.to_string(),
                        fence: Some(fence.clone()),
                    };
                    let line = Line {
                        number: i as u64 + 1,
                        bytes: line.into_bytes(),
                        oversize: false,
                    };
                    assert_eq!(
                        workers.submit_from(i as u64 + 1, line, Some(origin), &reply),
                        Some(true)
                    );
                }
            });
            drop(reply);
            replies.iter().map(|d| d.result).collect::<Vec<_>>()
        };
        let run = |id: &str, fence: &Fence, token: &str| run_all(&[(id, token)], fence).remove(0);
        assert!(matches!(
            run("f-1", &old, "nats:s:1:1"),
            Ok(Outcome::Processed(_))
        ));
        // Delivered again to the same owner: its own token, nothing new.
        assert!(matches!(
            run("f-1", &old, "nats:s:1:1"),
            Ok(Outcome::Processed(_))
        ));
        assert_eq!(claim(&new, "b"), Some(5), "a higher token takes the fence");
        assert_eq!(claim(&old, "a"), None, "a lower token never takes it back");
        assert!(!record(&old, 8), "a former owner records nothing");
        assert!(record(&new, 8));
        assert_eq!(
            claim(&new, "b"),
            Some(8),
            "claimed again: where it was left"
        );
        assert_eq!(
            claim_in(&new, "b", stream + 1),
            Some(0),
            "another stream of the same name starts from its beginning"
        );
        assert!(record_in(&new, stream + 1, 2), "and is recorded from there");
        assert_eq!(claim_in(&new, "b", stream + 1), Some(2));
        match run("f-2", &old, "nats:s:1:2") {
            Err(Failure::Fenced(key)) => assert_eq!(key, "normalizer/3"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run("f-2", &new, "nats:s:1:2"),
            Ok(Outcome::Processed(_))
        ));
        // A whole batch behind the fence.
        let batch = run_all(
            &[
                ("f-31", "nats:s:1:31"),
                ("f-32", "nats:s:1:32"),
                ("f-33", "nats:s:1:33"),
            ],
            &old,
        );
        assert_eq!(batch.len(), 3);
        assert!(
            batch.iter().all(|r| matches!(r, Err(Failure::Fenced(_)))),
            "{batch:?}"
        );
        let snapshot = t.snapshot();
        assert_eq!(snapshot.processed, ["f-1", "f-2"]);
        assert_eq!(snapshot.readings.len(), 2, "{:?}", snapshot.readings);
    }
}

/// Runs `body` with a JetStream context on the cluster at `urls`.
fn with_jetstream<T>(urls: &str, body: impl AsyncFnOnce(async_nats::jetstream::Context) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let addrs = normalizer::feed::server_addrs(urls).unwrap();
        let client = async_nats::connect(addrs).await.unwrap();
        body(async_nats::jetstream::new(client)).await
    })
}

/// Publishes raw payloads to `sensors.<token>` and waits for each to be stored.
fn publish_raw(urls: &str, payloads: &[(&str, Vec<u8>)]) {
    with_jetstream(urls, async |js| {
        for (token, payload) in payloads {
            js.publish(format!("sensors.{token}"), payload.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
}

/// How many consumers the cluster at `urls` creates on `stream` while it
/// watches, for `during` (JetStream's creation advisories).
fn consumers_created(urls: &str, stream: &str, during: Duration) -> usize {
    with_jetstream(urls, async |js| {
        use futures_util::StreamExt;
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream}.*");
        let mut advisories = js.client().subscribe(subject).await.unwrap();
        js.client().flush().await.unwrap();
        let mut created = 0;
        let end = tokio::time::Instant::now() + during;
        while let Ok(Some(_)) = tokio::time::timeout_at(end, advisories.next()).await {
            created += 1;
        }
        created
    })
}

/// The keys of the ownership bucket that hold `value` now.
fn keys_holding(urls: &str, value: &str) -> Vec<String> {
    with_jetstream(urls, async |js| {
        use futures_util::TryStreamExt;
        let stream = js.get_stream("KV_normalizer-owners").await.unwrap();
        let subjects: Vec<(String, usize)> = stream
            .info_with_subjects("$KV.normalizer-owners.>")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut holding = Vec::new();
        for (subject, _) in subjects {
            // Gone since the listing (expired) counts as not holding.
            if let Ok(last) = stream.get_last_raw_message_by_subject(&subject).await {
                if last.payload.as_ref() == value.as_bytes() {
                    holding.push(subject);
                }
            }
        }
        holding
    })
}

/// Every consumer's messages delivered and acknowledged.
fn all_acknowledged(urls: &str) -> bool {
    with_jetstream(urls, async |js| {
        use futures_util::StreamExt;
        let stream = js.get_stream("normalizer").await.unwrap();
        let mut consumers = stream.consumers();
        let mut all = true;
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            all &= info.num_pending == 0 && info.num_ack_pending == 0;
        }
        all
    })
}

#[test]
fn bad_nats_messages_become_dead_letters_and_are_acknowledged() {
    let pg = crate::pg::shared();
    let url = pg.create_database();
    TestDb::open(&url, PoolSettings::default()).provision(crate::support::DEVICES);
    let nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let instance = Instance::start(dir.path(), "bad", &url, &nats.urls, &[]);
    let valid = crate::support::msg("ok-1", "dev-0042", "2026-11-29T10:00:00Z", r#"{"t":21.5}"#);
    publish_raw(
        &nats.urls,
        &[
            ("dev-0042", vec![b'x'; 1536 * 1024]),
            ("dev-0042", vec![0xff, 0xfe, b'{']),
            ("dev-0042", Vec::new()),
            ("dev-0042", b"not json".to_vec()),
            ("dev-0042", valid.into_bytes()),
        ],
    );
    let mut conn = PgConnection::establish(&url).unwrap();
    wait_until("five outcomes", Duration::from_secs(60), || {
        done(&mut conn) >= 5
    });
    wait_until(
        "every message acknowledged",
        Duration::from_secs(30),
        || all_acknowledged(&nats.urls),
    );
    let snapshot = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_eq!(snapshot.processed, ["ok-1"]);
    let kinds: Vec<&str> = snapshot.dead_letters.iter().map(|d| d.2.as_str()).collect();
    assert_eq!(kinds, ["malformed"; 4], "{:?}", snapshot.dead_letters);
    let errors: Vec<&str> = snapshot.dead_letters.iter().map(|d| d.3.as_str()).collect();
    for needle in ["longer than", "UTF-8", "empty", "JSON"] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle:?} in {errors:?}"
        );
    }
    let (status, log) = instance.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_stream_of_another_partition_count_is_one_line_at_start_and_nothing_is_consumed() {
    let pg = crate::pg::shared();
    let url = pg.create_database();
    TestDb::open(&url, PoolSettings::default()).provision(crate::support::DEVICES);
    let nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    // The stream made for 8 partitions; the server's mapping says 16, so
    // half the devices would have nowhere to go: publishes to them fail.
    let first = Instance::start(
        dir.path(),
        "eight",
        &url,
        &nats.urls,
        &["--nats-partitions", "8"],
    );
    let (status, _) = first.stop();
    assert!(status.success());
    let started = Instant::now();
    let out = bin()
        .args(["--database-url", &url, "serve", "--nats", &nats.urls])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("8 partitions") && stderr.contains("--nats-partitions 8"),
        "{stderr}"
    );
    println!(
        "nats mismatch: exit 1 after {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        stderr.trim()
    );
    let mut conn = PgConnection::establish(&url).unwrap();
    assert_eq!(done(&mut conn), 0);
    assert!(fence_owners(&mut conn)
        .iter()
        .all(|(key, _)| { key.rsplit('/').next().unwrap().parse::<u32>().unwrap() < 8 }));
}

/// NATS gone (every node killed) and back, and the database gone and back,
/// under one instance: each outage is logged once when it starts and once
/// when it ends, nothing is dead-lettered for it, and the end state is exact.
#[test]
fn nats_and_database_outages_are_ridden_out_and_logged_once_each() {
    let pg = PgCluster::start_new();
    let Scene {
        clean,
        total,
        url,
        conn,
        nats,
        dir,
        file,
        ..
    } = Scene::new(&pg, 20_000);
    let mut conn = conn;
    let instance = Instance::start(
        dir.path(),
        "outages",
        &url,
        &nats.urls,
        &["--nats-replicas", "3"],
    );
    // The input in two halves: the second is published while the database
    // is down, so that the instance has work to apply during the outage.
    let input = std::fs::read_to_string(&file).unwrap();
    let halves = write_halves(dir.path(), &input);
    publish(&nats.urls, &halves[0]);
    wait_for_lines("a third", total / 3, || done(&mut conn));
    drop(conn);
    pg.stop("immediate");
    publish(&nats.urls, &halves[1]);
    std::thread::sleep(Duration::from_secs(4));
    pg.start();
    let mut conn = PgConnection::establish(&url).unwrap();
    wait_for_lines("more after the database came back", total * 2 / 3, || {
        done(&mut conn)
    });
    for node in 1..=3 {
        nats.kill(node);
    }
    std::thread::sleep(Duration::from_secs(4));
    nats.start_missing();
    let mut conn = PgConnection::establish(&url).unwrap();
    wait_for_lines("every line", total, || done(&mut conn));
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_exact(&clean, &faulty);
    let (status, log) = instance.stop();
    assert!(status.success(), "{log}");
    let count = |needle: &str| log.matches(needle).count();
    assert_eq!(count("nats: unreachable"), 1, "{log}");
    assert_eq!(count("nats: reachable again"), 1, "{log}");
    assert_eq!(count("database unreachable since"), 1, "{log}");
    assert_eq!(count("database back after"), 1, "{log}");
}

/// Another client fetches one message from an instance's consumer and
/// never acknowledges it: the instance sees its deliveries jump, applies
/// nothing past the missing one, takes the partition again from its
/// acknowledged point, and the end state (alerts included) is exact. The
/// thief waits on the consumer and the instance asks only for what is
/// there, so the missing delivery is the consumer's very first one.
#[test]
fn a_delivery_taken_by_another_client_is_not_overtaken() {
    let Scene {
        clean,
        total,
        url,
        mut conn,
        nats,
        dir,
        file,
        ..
    } = Scene::new(crate::pg::shared(), 5_000);
    let instance = Instance::start(dir.path(), "gap", &url, &nats.urls, &[]);
    wait_until("partition 0 owned", Duration::from_secs(30), || {
        instance.log().contains("owning partition 0 ")
    });
    // The thief waits on partition 0's consumer before anything is sent.
    let urls = nats.urls.clone();
    let thief = std::thread::spawn(move || {
        with_jetstream(&urls, async |js| {
            use futures_util::StreamExt;
            let stream = js.get_stream("normalizer").await.unwrap();
            let mut names = stream.consumer_names();
            let mut name = None;
            while let Some(n) = names.next().await {
                let n = n.unwrap();
                if n.starts_with("p0-") {
                    name = Some(n);
                }
            }
            let consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(&name.unwrap()).await.unwrap();
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(Duration::from_secs(20))
                .messages()
                .await
                .unwrap();
            // Taken, never acknowledged.
            batch.next().await.map(|m| m.is_ok())
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    publish(&nats.urls, &file);
    assert_eq!(thief.join().unwrap(), Some(true), "the thief got a message");
    wait_for_lines("every line", total, || done(&mut conn));
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_exact(&clean, &faulty);
    let (status, log) = instance.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("went missing"), "{log}");
}

/// The lines of every node's log of `nats` that report a refused publish
/// or subscription.
fn violations(nats: &NatsCluster) -> Vec<String> {
    (1..=3)
        .flat_map(|n| {
            { std::fs::read_to_string(nats.dir.join(format!("node{n}.log"))).unwrap_or_default() }
                .lines()
                .filter(|l| l.contains("Violation"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_secured_cluster_runs_instances_under_least_privilege_and_takes_a_killed_ones_partitions() {
    let pg = crate::pg::shared();
    let Scene {
        input,
        clean,
        total,
        url,
        mut conn,
        nats,
        dir,
        ..
    } = Scene::on(pg, 5_000, NatsCluster::start_secure());
    assert!(nats.urls.starts_with("tls://"), "{}", nats.urls);
    let normalizer = nats.login("normalizer");
    let producer = nats.login("producer");
    let mut extra: Vec<&str> = normalizer.iter().map(String::as_str).collect();
    extra.extend(["--nats-replicas", "3"]);
    let mut instances = three_instances(dir.path(), "s", &url, &nats.urls, &extra);
    let [first, second] = write_halves(dir.path(), &input);
    let sent = send_as(&nats.urls, &producer, &first).join().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    wait_for_lines("some of the first half", 1, || done(&mut conn));
    // The fault, required: an instance killed, its partitions taken over.
    let victim = instances[0].name();
    assert!(
        fence_owners(&mut conn)
            .iter()
            .any(|(_, owner)| *owner == victim),
        "the victim owns partitions before it is killed"
    );
    instances[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    let sent = send_as(&nats.urls, &producer, &second).join().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    wait_until(
        "the killed instance's partitions taken over",
        Duration::from_secs(60),
        || {
            !fence_owners(&mut conn)
                .iter()
                .any(|(_, owner)| *owner == victim)
        },
    );
    let takeover = killed.elapsed();
    wait_for_lines("every line", total, || done(&mut conn));
    let faulty = TestDb::open(&url, PoolSettings::default()).snapshot();
    assert_exact(&clean, &faulty);
    // Under exactly these permissions nothing the instances or send did
    // was refused.
    assert_eq!(
        violations(&nats),
        Vec::<String>::new(),
        "refused operations"
    );

    // MQTT over TLS with the producer's credentials reaches the database
    // (an unprovisioned device: a dead letter); without them, refused.
    let password = std::fs::read_to_string(nats.dir.join("producer.password")).unwrap();
    let ca = nats.dir.join("ca.crt");
    let mqtt = |id: &str, login: &[&str]| {
        let line = format!(
            r#"{{"id":"{id}","device":"hall/secure","ts":"2026-01-01T00:00:00Z","payload":{{"t":1}}}}"#
        );
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &nats.mqtt_port.to_string(),
                "--cafile",
            ])
            .arg(&ca)
            .args(login)
            .args(["-q", "1", "-t", "sensors/hall/secure", "-m", &line])
            .output()
            .unwrap()
    };
    let out = mqtt("mqtt-anonymous", &[]);
    assert!(!out.status.success(), "MQTT without credentials is refused");
    let out = mqtt("mqtt-producer", &["-u", "producer", "-P", password.trim()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_lines("the MQTT message", total + 1, || done(&mut conn));
    let ids: Vec<String> = diesel::sql_query(
        "SELECT message_id AS device_key FROM dead_letters WHERE message_id LIKE 'mqtt-%'",
    )
    .load::<DeviceKey>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|k| k.device_key)
    .collect();
    assert_eq!(ids, ["mqtt-producer"]);

    // The producer may do nothing else: each attempt is refused by the server.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .user_and_password("producer".into(), password.trim().into())
            .add_root_certificates(ca.clone())
            .connect(normalizer::feed::server_addrs(&nats.urls).unwrap())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client.clone());
        assert!(js.delete_stream("normalizer").await.is_err());
        let _sub = client.subscribe("normalizer.>").await.unwrap();
        client
            .publish("$KV.normalizer-owners.normalizer/0", "mine".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let refused = violations(&nats).join("\n");
    for what in [
        "Publish Violation - User \"producer\", Subject \"$JS.API.STREAM.DELETE.normalizer\"",
        "Subscription Violation - User \"producer\", Subject \"normalizer.>\"",
        "Publish Violation - User \"producer\", Subject \"$KV.normalizer-owners.normalizer/0\"",
    ] {
        assert!(refused.contains(what), "{what} not in {refused}");
    }
    assert!(!refused.contains("User \"normalizer\""), "{refused}");
    for instance in instances.drain(1..) {
        let (status, log) = instance.stop();
        assert!(status.success(), "{status}: {log}");
    }
    println!(
        "nats secured: TLS, users with least privilege; 1 of 3 instances killed, taken over after {:.1} s; exact",
        takeover.as_secs_f64()
    );
}

#[derive(QueryableByName)]
struct DeviceKey {
    #[diesel(sql_type = diesel::sql_types::Text)]
    device_key: String,
}
