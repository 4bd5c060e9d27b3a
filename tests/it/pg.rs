//! Throwaway PostgreSQL clusters that the tests own: initdb into a temporary
//! folder, a free port on 127.0.0.1, stopped and removed when dropped. Tests
//! may stop, restart and break them; the machine's own server is never used.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl};

/// A PostgreSQL cluster of the test's own.
pub struct PgCluster {
    root: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// The port of its standby, once it has one: its URLs name both.
    standby: Option<u16>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn bindir() -> PathBuf {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config is installed");
    assert!(out.status.success(), "pg_config --bindir failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A free loopback port below the kernel's ephemeral range, reserved for
/// this process by `scripts/lib/free-ports` (why below, and why reserved:
/// see there): never given again while the tests run, so a server stopped
/// and started on it finds it free.
pub(crate) fn free_port() -> u16 {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/lib/free-ports"
    ))
    .env("FREE_PORTS_OWNER", std::process::id().to_string())
    .output()
    .expect("scripts/lib/free-ports runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

impl PgCluster {
    /// initdb and start a new cluster; `conf` lines go into postgresql.conf.
    pub fn start_with(conf: &[&str]) -> PgCluster {
        Self::start_configured(conf, &[])
    }

    /// A new cluster that also listens on `address` and trusts clients of
    /// `clients` (a CIDR): for tests that reach it over a link of their own.
    pub fn start_listening_on(address: &str, clients: &str) -> PgCluster {
        Self::start_configured(
            &[&format!("listen_addresses = '127.0.0.1,{address}'")],
            &[&format!("host all all {clients} trust")],
        )
    }

    /// initdb and start a new cluster with `conf` lines in postgresql.conf
    /// and `hba` lines in pg_hba.conf.
    pub fn start_configured(conf: &[&str], hba: &[&str]) -> PgCluster {
        let cluster = PgCluster::unstarted();
        run(cluster
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&cluster.data));
        let mut settings = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", cluster.port),
            format!("unix_socket_directories = '{}'", cluster.root.display()),
            // fsync off is safe against a killed server (the OS keeps the
            // WAL); synchronous_commit stays on, or an immediate stop would
            // lose acknowledged commits.
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "max_connections = 60".into(),
            "lc_messages = 'C'".into(),
            "log_min_messages = warning".into(),
        ];
        settings.extend(conf.iter().map(|s| s.to_string()));
        let conf_path = cluster.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&settings.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).unwrap();
        // The test's lines first: the first line that matches decides.
        let hba_path = cluster.data.join("pg_hba.conf");
        let mut text: String = hba.iter().map(|line| format!("{line}\n")).collect();
        text.push_str(&std::fs::read_to_string(&hba_path).unwrap());
        std::fs::write(&hba_path, text).unwrap();
        cluster.start();
        cluster
    }

    /// A folder of its own (the postgres user's when we are root) and a
    /// free port, for a cluster not made yet.
    fn unstarted() -> PgCluster {
        let root = std::env::temp_dir().join(format!(
            "normalizer-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let data = root.join("data");
        let cluster = PgCluster {
            root,
            data,
            bindir: bindir(),
            port: free_port(),
            standby: None,
        };
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.root));
        }
        cluster
    }

    /// A hot standby of this cluster, started: a base backup streaming the
    /// primary's WAL (`pg_basebackup -R`), then made synchronous, so that a
    /// commit returns only once the standby has it on disk and a promotion
    /// loses no acknowledged commit. From then on this cluster's URLs name
    /// both servers and let libpq pick the writable one
    /// (`target_session_attrs=read-write`), as a client of a failover pair
    /// is configured.
    pub fn add_standby(&mut self) -> PgCluster {
        let standby = PgCluster::unstarted();
        run(standby
            .command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
            .args(["-p", &self.port.to_string(), "-D"])
            .arg(&standby.data));
        let conf_path = standby.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        // Later lines win over the primary's.
        text += &format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.root.display()
        );
        std::fs::write(&conf_path, text).unwrap();
        standby.start();
        let mut admin = self.admin();
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(sql).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let n = diesel::sql_query(
                "SELECT count(*) AS n FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'",
            )
            .get_result::<N>(&mut admin)
            .unwrap()
            .n;
            if n == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby streams synchronously"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.standby = Some(standby.port);
        standby
    }

    /// Promotes this standby to a primary, and waits until it is one.
    pub fn promote(&self) {
        let out = self.pg_ctl(&["-w", "-t", "60", "promote"]);
        assert!(
            out.status.success(),
            "pg_ctl promote: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// A new cluster with default settings.
    pub fn start_new() -> PgCluster {
        Self::start_with(&[])
    }

    /// A server tool, as the postgres user when we are root, run from the
    /// cluster's own folder (postgres may not enter the checkout).
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(&self.root);
        c
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let log = self.root.join("server.log");
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(log)
            .args(args)
            .output()
            .expect("pg_ctl runs")
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let out = self.pg_ctl(&["-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Starts the server without waiting.
    pub fn start_no_wait(&self) {
        let out = self.pg_ctl(&["-W", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server: `mode` is smart, fast or immediate.
    pub fn stop(&self, mode: &str) {
        let out = self.pg_ctl(&["-w", "-m", mode, "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Restarts the server with `pg_ctl restart -m mode`.
    pub fn restart(&self, mode: &str) {
        let out = self.pg_ctl(&["-w", "-m", mode, "restart"]);
        assert!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The end of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        text.lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The URL of a database of this cluster.
    pub fn url(&self, database: &str) -> String {
        match self.standby {
            None => format!("postgres://postgres@127.0.0.1:{}/{database}", self.port),
            Some(standby) => format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{standby}/{database}?target_session_attrs=read-write",
                self.port
            ),
        }
    }

    /// A superuser connection to the `postgres` database.
    pub fn admin(&self) -> PgConnection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match PgConnection::establish(&self.url("postgres")) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect to the test cluster: {e}"),
            }
        }
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t_{}", rand::random::<u64>());
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut self.admin())
            .unwrap();
        self.url(&name)
    }

    /// Creates a login role (not a superuser) and a database it owns;
    /// returns the URL that connects as that role.
    pub fn create_database_for(&self, role: &str) -> String {
        let name = format!("t_{}", rand::random::<u64>());
        let mut admin = self.admin();
        diesel::sql_query(format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .execute(&mut admin)
        .unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name} OWNER {role}"))
            .execute(&mut admin)
            .unwrap();
        format!("postgres://{role}@127.0.0.1:{}/{name}", self.port)
    }

    /// Terminates every backend of the normalizer (by application name) that
    /// is connected to the database of `url`, and waits until they are gone.
    pub fn terminate_normalizer_backends(&self, url: &str) -> usize {
        let database = url.rsplit('/').next().unwrap();
        let database = database.split('?').next().unwrap();
        #[derive(diesel::QueryableByName)]
        struct Killed {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let rows: Vec<Killed> = diesel::sql_query(
            "SELECT count(pg_terminate_backend(pid, 5000)) AS n FROM pg_stat_activity \
             WHERE application_name = 'normalizer' AND datname = $1",
        )
        .bind::<diesel::sql_types::Text, _>(database)
        .load(&mut self.admin())
        .unwrap();
        rows[0].n as usize
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

static SHARED: OnceLock<PgCluster> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(cluster) = SHARED.get() {
        let _ = cluster.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&cluster.root);
    }
}

/// One cluster for all tests of this process that do not break their server;
/// each test takes a database of its own in it. Stopped at process exit.
pub fn shared() -> &'static PgCluster {
    SHARED.get_or_init(|| {
        let cluster = PgCluster::start_new();
        // SAFETY: registering a plain extern "C" function has no preconditions.
        unsafe { libc::atexit(stop_shared) };
        cluster
    })
}
