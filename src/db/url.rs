//! Database URLs: which backend, where, and how to print it without secrets.

use std::path::PathBuf;

/// The default database: a SQLite file in the working directory.
pub(crate) const DEFAULT_URL: &str = "sqlite://normalizer.db";

/// libpq settings every PostgreSQL connection gets unless its URL sets them,
/// so that a dead peer is found in seconds, not after TCP's own minutes:
/// connecting gives up after 5 s, an idle connection (or one waiting for an
/// answer) is probed after 5 s of silence and declared dead after 3 more
/// unanswered probes 2 s apart, and data unacknowledged for 10 s closes it
/// (`tcp_user_timeout`, which also takes over from the probes' count).
pub(super) const LIBPQ_DEFAULTS: [(&str, &str); 5] = [
    ("connect_timeout", "5"),
    ("keepalives", "1"),
    ("keepalives_idle", "5"),
    ("keepalives_interval", "2"),
    ("keepalives_count", "3"),
];

/// The default `tcp_user_timeout`, in milliseconds. Each connection adds its
/// own number of milliseconds below 1,000, by which the deadline watchdog
/// tells its socket apart (see `db::deadline`).
pub(super) const TCP_USER_TIMEOUT_MS: u32 = 10_000;

/// A parsed database location.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A PostgreSQL connection URL, passed to libpq as it is.
    Postgres(String),
    /// A SQLite database file.
    Sqlite(PathBuf),
}

impl DatabaseUrl {
    /// Parses `postgres://…`, `postgresql://…`, `sqlite://PATH` or a bare path.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        if url.is_empty() {
            return Err("the database URL is empty".into());
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            check_postgres(url)?;
            return Ok(DatabaseUrl::Postgres(url.to_string()));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(format!("the database URL {url:?} names no SQLite file"));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(format!(
                "the database URL scheme {scheme:?} is not supported (use postgres://, postgresql:// or sqlite://)"
            ));
        }
        Ok(DatabaseUrl::Sqlite(PathBuf::from(url)))
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => redact(url),
        }
    }

    /// The URL handed to libpq: `url` with [`LIBPQ_DEFAULTS`] and
    /// `tcp_user_timeout` added where it does not set them itself. Returns
    /// the `tcp_user_timeout` it added (`TCP_USER_TIMEOUT_MS + nonce % 1000`),
    /// if it added one.
    pub(crate) fn libpq_url(url: &str, nonce: u32) -> (String, Option<u32>) {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let set: Vec<&str> = query
            .split('&')
            .filter_map(|p| p.split_once('=').map(|(k, _)| k))
            .collect();
        let mut added: Vec<String> = LIBPQ_DEFAULTS
            .iter()
            .filter(|(k, _)| !set.contains(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let marker =
            (!set.contains(&"tcp_user_timeout")).then_some(TCP_USER_TIMEOUT_MS + nonce % 1000);
        if let Some(ms) = marker {
            added.push(format!("tcp_user_timeout={ms}"));
        }
        if added.is_empty() {
            return (url.to_string(), marker);
        }
        let separator = match url.split_once('?') {
            None => "?",
            Some((_, "")) => "",
            Some(_) => "&",
        };
        (format!("{url}{separator}{}", added.join("&")), marker)
    }

    /// The mistakes in a SQLite path that no retry can mend, found before
    /// any connection: a folder, or a file in a folder that does not exist.
    pub fn check(&self) -> Result<(), String> {
        let DatabaseUrl::Sqlite(path) = self else {
            return Ok(());
        };
        if path.is_dir() {
            return Err(format!(
                "the SQLite database {} is a folder, not a file: name a file in it",
                path.display()
            ));
        }
        match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(folder) if !folder.is_dir() => Err(format!(
                "the folder of the SQLite database {} does not exist: create {} first",
                path.display(),
                folder.display()
            )),
            _ => Ok(()),
        }
    }

    /// `postgres` or `sqlite`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            DatabaseUrl::Postgres(_) => "postgres",
            DatabaseUrl::Sqlite(_) => "sqlite",
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Catches the URL mistakes libpq would only report at connect time, where
/// they would look like an unreachable server.
fn check_postgres(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        if host.starts_with('[') {
            continue;
        }
        if let Some((_, port)) = host.rsplit_once(':') {
            if port.parse::<u16>().is_err() {
                return Err(format!(
                    "the database URL {} has an invalid port {port:?}",
                    redact(url)
                ));
            }
        }
    }
    Ok(())
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = redact_query_password(tail);
    format!("{scheme}://{authority}{tail}")
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_select_the_backend() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://normalizer.db").unwrap(),
            DatabaseUrl::Sqlite("normalizer.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/n.db").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/n.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("data/n.db").unwrap(),
            DatabaseUrl::Sqlite("data/n.db".into())
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://u@h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        assert!(matches!(
            DatabaseUrl::parse("postgresql://h:5433/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
    }

    #[test]
    fn malformed_urls_are_refused_with_a_sentence() {
        assert!(DatabaseUrl::parse("mysql://h/db")
            .unwrap_err()
            .contains("not supported"));
        assert!(DatabaseUrl::parse("sqlite://")
            .unwrap_err()
            .contains("names no SQLite file"));
        assert!(DatabaseUrl::parse("postgres://h:port/db")
            .unwrap_err()
            .contains("invalid port"));
        assert!(DatabaseUrl::parse("").is_err());
    }

    #[test]
    fn libpq_gets_timeouts_and_keepalives_unless_the_url_sets_them() {
        let (url, marker) = DatabaseUrl::libpq_url("postgres://u@h/db", 1234);
        assert_eq!(
            url,
            "postgres://u@h/db?connect_timeout=5&keepalives=1&keepalives_idle=5&keepalives_interval=2&keepalives_count=3&tcp_user_timeout=10234"
        );
        assert_eq!(marker, Some(10_234));
        let (url, marker) = DatabaseUrl::libpq_url(
            "postgres://u@h/db?sslmode=require&connect_timeout=30&tcp_user_timeout=0",
            7,
        );
        assert_eq!(
            url,
            "postgres://u@h/db?sslmode=require&connect_timeout=30&tcp_user_timeout=0&keepalives=1&keepalives_idle=5&keepalives_interval=2&keepalives_count=3"
        );
        assert_eq!(marker, None, "the URL's own tcp_user_timeout is kept");
        let (url, _) = DatabaseUrl::libpq_url("postgres://u@h/db?", 0);
        assert!(
            url.starts_with("postgres://u@h/db?connect_timeout=5&"),
            "{url}"
        );
    }

    #[test]
    fn a_sqlite_path_that_cannot_be_a_database_is_named_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let folder = DatabaseUrl::Sqlite(dir.path().to_path_buf());
        assert!(folder
            .check()
            .unwrap_err()
            .contains("is a folder, not a file"));
        let missing = DatabaseUrl::Sqlite(dir.path().join("nope/n.db"));
        assert!(missing
            .check()
            .unwrap_err()
            .contains("does not exist: create"));
        assert!(DatabaseUrl::Sqlite(dir.path().join("n.db")).check().is_ok());
        assert!(DatabaseUrl::Sqlite("n.db".into()).check().is_ok());
        assert!(DatabaseUrl::Postgres("postgres://h/db".into())
            .check()
            .is_ok());
    }

    #[test]
    fn passwords_never_show() {
        let url =
            DatabaseUrl::parse("postgres://app:s3cret@db:5432/n?password=s3cret&sslmode=require")
                .unwrap();
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            shown,
            "postgres://app:***@db:5432/n?password=***&sslmode=require"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        let bad = DatabaseUrl::parse("postgres://app:s3cret@db:x/n").unwrap_err();
        assert!(!bad.contains("s3cret"), "{bad}");
    }
}
