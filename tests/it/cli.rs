//! The binary as users run it: exit codes, one-sentence errors, the summary.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::pg;

fn normalizer(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn examples(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_quickstart_runs_into_normalizer_db_and_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = normalizer(
        dir.path(),
        &[
            "ingest",
            "--provision",
            &examples("devices.json"),
            &examples("messages.jsonl"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        text.contains("processed 579, duplicate 1, dead letter 6"),
        "{text}"
    );
    assert!(text.contains("messages/s"), "{text}");
    assert!(dir.path().join("normalizer.db").exists());
    // Not a terminal: no progress bar on stderr.
    assert!(!stderr(&out).contains('%'), "{}", stderr(&out));
}

#[test]
fn ingest_provisions_first_at_every_log_level() {
    // The load once ran inside `log::info!`, whose arguments a quieter
    // level never evaluates: `--log-level warn` skipped the provisioning.
    for level in ["off", "error", "warn", "info"] {
        let dir = tempfile::tempdir().unwrap();
        let out = normalizer(
            dir.path(),
            &[
                "--log-level",
                level,
                "ingest",
                "--provision",
                &examples("devices.json"),
                &examples("messages.jsonl"),
            ],
        );
        assert!(out.status.success(), "{level}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("processed 579, duplicate 1, dead letter 6"),
            "{level}: {text}"
        );
    }
}

#[test]
fn json_summary_counts_every_outcome_and_reads_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let url = format!("sqlite://{}", db.display());
    let p = normalizer(
        dir.path(),
        &[
            "--database-url",
            &url,
            "provision",
            &examples("devices.json"),
        ],
    );
    assert!(p.status.success(), "{}", stderr(&p));
    let mut child = Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .args(["--database-url", &url, "ingest", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                std::fs::read(examples("messages.jsonl"))
                    .unwrap()
                    .as_slice(),
            )
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["processed"], 579);
    assert_eq!(v["duplicates"], 1);
    assert_eq!(v["dead_letters_by_kind"]["malformed"], 2);
    assert_eq!(v["dead_letters_by_kind"]["unknown_device"], 1);
    assert_eq!(v["lines"], 586);
    assert!(v["database"]["retries"]["deadlock"].is_u64());
    assert!(v["messages_per_second"].as_f64().unwrap() > 0.0);
    let status = normalizer(dir.path(), &["--database-url", &url, "status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["processed_messages"], 579);
}

#[test]
fn setup_errors_exit_non_zero_with_one_sentence_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad_provisioning = dir.path().join("bad.json");
    std::fs::write(&bad_provisioning, r#"{"devices":[{"key":"d","profile":"p","sensors":[{"metric":"t","alarms":[{"name":"a","condition":"above","threshold":1}]}]}]}"#).unwrap();
    let bad = bad_provisioning.to_str().unwrap();
    let input = examples("messages.jsonl");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["ingest", "--no-such-flag"], "unexpected argument"),
        (
            vec!["ingest", "/no/such/file.jsonl"],
            "cannot open the input file /no/such/file.jsonl",
        ),
        (
            vec!["--database-url", "mysql://h/db", "migrate"],
            "not supported",
        ),
        (
            vec!["--database-url", "postgres://h:notaport/db", "migrate"],
            "invalid port",
        ),
        (
            vec!["ingest", "--provision", bad, &input],
            "condition \"above\" is not one of gt, gte, lt, lte",
        ),
        (vec!["provision", bad], "alarms[0] (\"a\")"),
        (
            vec!["ingest", "--workers", "0", &input],
            "--workers must be at least 1",
        ),
    ];
    for (args, expected) in cases {
        let out = normalizer(dir.path(), &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !dir.path().join("normalizer.db").exists(),
            "{args:?} created the database"
        );
    }
}

/// Mistakes no retry can mend stop at once, exit 1, with one sentence on
/// stderr that names what to fix; never "waiting" for 5 minutes.
#[test]
fn fatal_setup_errors_exit_1_at_once_with_one_sentence() {
    let cluster =
        pg::PgCluster::start_configured(&[], &["host all pwuser 127.0.0.1/32 scram-sha-256"]);
    let mut admin = cluster.admin();
    diesel::RunQueryDsl::execute(
        diesel::sql_query("CREATE ROLE pwuser LOGIN PASSWORD 's3cret-right'"),
        &mut admin,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().to_str().unwrap().to_string();
    let port = cluster.port;
    let cases: Vec<(String, &str)> = vec![
        (format!("sqlite://{folder}"), "is a folder, not a file"),
        (
            format!("sqlite://{folder}/no/such/n.db"),
            "does not exist: create",
        ),
        (
            format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=bogus"),
            "invalid sslmode value",
        ),
        (
            format!("postgres://pwuser@127.0.0.1:{port}/postgres"),
            "no password supplied",
        ),
        (
            format!("postgres://pwuser:s3cret-wrong@127.0.0.1:{port}/postgres"),
            "password authentication failed for user \"pwuser\"",
        ),
    ];
    for (url, expected) in cases {
        let started = std::time::Instant::now();
        let out = normalizer(dir.path(), &["--database-url", &url, "status"]);
        let took = started.elapsed();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains(expected), "{url}: {err}");
        assert_eq!(err.lines().count(), 1, "one sentence: {err}");
        assert!(
            !err.contains("timed out waiting") && !err.contains("s3cret"),
            "what happened, not the pool's internals, and no password: {err}"
        );
        // A set-up error is promised within 5 s from start to exit
        // (docs/SECURITY.md); an outage would be waited out for minutes.
        assert!(
            took < std::time::Duration::from_secs(5),
            "{url}: took {took:?}, as if it waited out an outage"
        );
    }
    // A log file that cannot be opened: its path as given, once.
    let out = normalizer(
        dir.path(),
        &["--log-file", "/nonexistent/dir/x.log", "status"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "normalizer: error: cannot open the log file /nonexistent/dir/x.log: No such file or directory (os error 2)"
    );
}

#[test]
fn a_postgres_url_selects_postgres_and_the_password_never_shows() {
    let cluster = pg::shared();
    let url = cluster.create_database();
    let dir = tempfile::tempdir().unwrap();
    let out = normalizer(
        dir.path(),
        &[
            "--database-url",
            &url,
            "ingest",
            "--provision",
            &examples("devices.json"),
            &examples("messages.jsonl"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!dir.path().join("normalizer.db").exists());
    let env = Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .env("DATABASE_URL", &url)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&env.stdout).unwrap();
    assert_eq!(
        s["processed_messages"], 579,
        "DATABASE_URL is read when the flag is absent"
    );
    // A wrong password: the server trusts everyone here, so use a closed port
    // and check the error text instead.
    let out = normalizer(
        dir.path(),
        &[
            "--database-url",
            "postgres://app:s3cret@127.0.0.1:1/db",
            "--max-outage",
            "1s",
            "migrate",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "gave up on an unreachable database"
    );
    let err = stderr(&out);
    assert!(err.contains("gave up") && !err.contains("s3cret"), "{err}");
}

#[test]
fn an_outage_is_logged_once_when_it_starts_and_once_when_it_ends() {
    let cluster = pg::PgCluster::start_new();
    let url = cluster.create_database();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let devices = dir.path().join("devices.json");
    let options = normalizer::gen::GenOptions {
        devices: 20,
        messages: 2000,
        seed: 3,
        ..Default::default()
    };
    std::fs::write(
        &devices,
        normalizer::gen::provisioning(&options).to_string(),
    )
    .unwrap();
    normalizer::gen::messages(&options, &mut std::fs::File::create(&input).unwrap()).unwrap();
    let p = normalizer(
        dir.path(),
        &[
            "--database-url",
            &url,
            "provision",
            devices.to_str().unwrap(),
        ],
    );
    assert!(p.status.success(), "{}", stderr(&p));
    cluster.stop("fast");
    let child = Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .args([
            "--database-url",
            &url,
            "ingest",
            "--workers",
            "4",
            input.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    cluster.start();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("database unreachable since").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains(&format!("waiting for {url} until ")),
        "says what it waits for, and until when: {err}"
    );
    assert_eq!(err.matches("database back after").count(), 1, "{err}");
    assert!(
        err.lines().count() < 30,
        "no line per failed attempt per worker:\n{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dead letter") && text.contains("outage"),
        "{text}"
    );
}

#[test]
fn batch_size_one_runs_one_transaction_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], db: &str| {
        let mut args = vec!["--database-url", db, "ingest", "--json", "--provision"];
        let devices = examples("devices.json");
        let messages = examples("messages.jsonl");
        args.push(&devices);
        args.extend_from_slice(extra);
        args.push(&messages);
        let out = normalizer(dir.path(), &args);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["database"]["transactions"].as_u64().unwrap()
    };
    let one = run(
        &["--batch-size", "1"],
        &format!("sqlite://{}/a.db", dir.path().display()),
    );
    let batched = run(
        &["--batch-size", "500"],
        &format!("sqlite://{}/b.db", dir.path().display()),
    );
    assert!(one > 580, "one transaction per line: {one}");
    assert!(batched < 50, "a few batches: {batched}");
}

/// A service waits out an outage as long as it takes unless told
/// otherwise; `ingest` gives up after 5 minutes by default.
#[test]
fn serve_waits_out_an_outage_as_long_as_it_takes_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::pg::free_port();
    let url = format!("postgres://app@127.0.0.1:{port}/n");
    let log = dir.path().join("n.log");
    let wait_for = |args: &[&str], expected: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_normalizer"))
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .args(["--database-url", &url, "--log-file"])
            .arg(&log)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("database unreachable since") || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&log);
        assert!(text.contains(expected), "{args:?}: {text}");
    };
    let socket = dir.path().join("n.sock");
    wait_for(
        &["serve", "--socket", socket.to_str().unwrap()],
        &format!("waiting for {url} as long as it takes"),
    );
    wait_for(&["status"], &format!("waiting for {url} until "));
}

/// README "Running on PostgreSQL": after the migrations, a role needs only
/// SELECT, INSERT, UPDATE, DELETE on the tables and USAGE on their
/// sequences. With exactly those grants every command runs; with
/// `--no-migrate` a schema that is not up to date is one clear error.
#[test]
fn a_role_with_only_row_rights_runs_every_command_once_the_schema_is_up_to_date() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let cluster = pg::PgCluster::start_new();
    let dir = tempfile::tempdir().unwrap();
    let owner_url = cluster.create_database();
    let database = owner_url.rsplit('/').next().unwrap().to_string();
    let migrated = normalizer(dir.path(), &["--database-url", &owner_url, "migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    diesel::PgConnection::establish(&owner_url)
        .unwrap()
        .batch_execute(
            "CREATE ROLE dml LOGIN;
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO dml;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dml;
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dml;",
        )
        .unwrap();
    let url = format!("postgres://dml@127.0.0.1:{}/{database}", cluster.port);
    let (devices, messages) = (examples("devices.json"), examples("messages.jsonl"));
    let commands: Vec<Vec<&str>> = vec![
        vec!["provision", &devices],
        vec!["ingest", &messages],
        vec!["status"],
        vec!["dead-letters", "list"],
        vec!["dead-letters", "replay"],
        vec!["ingest", "--provision", &devices, &messages],
    ];
    for args in commands {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend(&args);
        let out = normalizer(dir.path(), &all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    let fresh = cluster.create_database();
    let out = normalizer(
        dir.path(),
        &["--database-url", &fresh, "--no-migrate", "status"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not up to date") && err.contains("normalizer migrate"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// What the README and `--help` say is what the commands do.
#[test]
fn the_command_line_keeps_its_word() {
    let dir = tempfile::tempdir().unwrap();
    let db = ["--database-url", "sqlite://n.db"];
    let run = |args: &[&str]| {
        let mut all = db.to_vec();
        all.extend(args);
        normalizer(dir.path(), &all)
    };
    // A level that is not one is refused, not silently ignored.
    let out = run(&["--log-level", "verbose", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a level"), "{}", stderr(&out));
    assert!(run(&["--log-level", "normalizer::db=debug,warn", "status"])
        .status
        .success());
    // Generating for no device is a usage error, not dev-00000.
    let out = run(&["gen", "--devices", "0", "--messages", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // The help does not show an empty environment value.
    let help = String::from_utf8_lossy(&run(&["ingest", "--help"]).stdout).into_owned();
    assert!(
        help.contains("NORMALIZER_BATCH_SIZE") && !help.contains("NORMALIZER_BATCH_SIZE="),
        "{help}"
    );
    // Every command that reports takes --json.
    let (devices, messages) = (examples("devices.json"), examples("messages.jsonl"));
    for args in [
        vec!["migrate", "--json"],
        vec!["provision", &devices, "--json"],
        vec!["ingest", &messages, "--json"],
        vec!["status", "--json"],
        vec!["dead-letters", "list", "--json"],
        vec!["dead-letters", "replay", "--json"],
        vec![
            "dead-letters",
            "purge",
            "--kind",
            "malformed",
            "--older-than",
            "30d",
            "--json",
        ],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str::<serde_json::Value>(text.trim())
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"));
    }
    // A limited list says how many of how many.
    let all = run(&["dead-letters", "list", "--json"]);
    let total = serde_json::from_slice::<Vec<serde_json::Value>>(&all.stdout)
        .unwrap()
        .len();
    assert!(total > 2, "the example has more than 2 dead letters");
    let out = run(&["dead-letters", "list", "--limit", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("2 of {total} dead letters")),
        "{text}"
    );
}

/// Ctrl-C during `ingest`: reading stops, what is in flight is finished,
/// the summary and the line to resume from are printed, exit 130; running
/// the same input again completes it.
#[test]
fn ctrl_c_during_ingest_finishes_what_is_in_flight_and_says_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (devices, text) = crate::chaos::input(100_000);
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, &text).unwrap();
    let url = format!("sqlite://{}", dir.path().join("n.db").display());
    let faulty = crate::support::TestDb::open(&url, Default::default());
    faulty.provision(&devices);
    let child = Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .args(["--database-url", &url, "ingest", "--workers", "2"])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while faulty.status().processed_messages == 0 {
        assert!(std::time::Instant::now() < deadline, "the run started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at line ")
            && err.contains("running the same input again is safe"),
        "{err}"
    );
    assert!(err.contains("lines "), "the summary is printed: {err}");
    let done_before = faulty.status().processed_messages;
    assert!(
        done_before > 0 && done_before < 90_000,
        "stopped mid-run: {done_before}"
    );

    let rerun = normalizer(
        dir.path(),
        &["--database-url", &url, "ingest", input.to_str().unwrap()],
    );
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let clean = crate::support::sqlite();
    clean.provision(&devices);
    clean.ingest(&text);
    crate::support::same_as_clean_after_a_rerun(&clean.snapshot(), &faulty.snapshot());
}

/// A one-off command run with the service's config does not write into the
/// service's log file unless told so; every log line names its process.
#[test]
fn one_off_commands_stay_out_of_the_service_log_and_each_line_names_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let config = dir.path().join("n.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}\"\nlog_file = \"{}\"\nlog_level = \"debug\"\n",
            dir.path().join("n.db").display(),
            log.display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let out = normalizer(dir.path(), &["--config", cfg, "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !log.exists(),
        "the one-off command kept out of the service log"
    );
    let child = Command::new(env!("CARGO_BIN_EXE_normalizer"))
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .args(["--config", cfg, "--log-file"])
        .arg(&log)
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.contains(&format!(" {pid} normalizer")), "{line}");
    }
}

/// Packaging stages a prebuilt binary without building anything.
#[test]
fn install_stages_a_prebuilt_binary_without_building() {
    let stage = tempfile::tempdir().unwrap();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install"))
        .env("DESTDIR", stage.path())
        .env("BIN", env!("CARGO_BIN_EXE_normalizer"))
        // No cargo on this PATH: building would fail.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let staged = std::fs::read(stage.path().join("usr/local/bin/normalizer")).unwrap();
    assert_eq!(
        staged,
        std::fs::read(env!("CARGO_BIN_EXE_normalizer")).unwrap()
    );
    for file in [
        "etc/systemd/system/normalizer.service",
        "etc/normalizer/normalizer.toml",
        "etc/logrotate.d/normalizer",
        "usr/local/share/doc/normalizer/grafana/normalizer.json",
    ] {
        assert!(stage.path().join(file).exists(), "{file}");
    }
    let mapping = std::fs::read_to_string(
        stage
            .path()
            .join("usr/local/share/doc/normalizer/nats/normalizer.conf"),
    )
    .unwrap();
    assert!(
        mapping.contains("normalizer.p.{{partition(16,1)}}") && !mapping.contains('@'),
        "{mapping}"
    );
    let permissions = std::fs::read_to_string(
        stage
            .path()
            .join("usr/local/share/doc/normalizer/nats/permissions.conf"),
    )
    .unwrap();
    assert!(
        permissions.contains("\"$JS.API.STREAM.INFO.normalizer\"") && !permissions.contains('@'),
        "{permissions}"
    );
}
