//! Connecting to NATS: how this instance logs in (user and password, a
//! token, an NKey, a credentials file), how it checks the server (TLS, a
//! CA, a client certificate), and which failures at start are the
//! operator's to fix rather than an outage to wait out.
//!
//! async-nats takes credentials only as options: the user info of a URL is
//! not sent. So [`split_credentials`] takes it out of the URLs (which are
//! then safe to print) and makes it a [`Login`] like any other.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions};

use crate::secret::Secret;

/// One way to log in to NATS.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Login {
    /// No credentials (a server without authorization).
    #[default]
    Anonymous,
    /// A user name and its password.
    UserPassword {
        /// The user.
        user: String,
        /// Its password.
        password: Secret,
    },
    /// An authorization token.
    Token(Secret),
    /// An NKey: the seed, read from `file`, signs the server's nonce.
    NKey {
        /// Where the seed came from.
        file: PathBuf,
        /// The seed (`SU…`).
        seed: Secret,
    },
    /// Decentralized authorization: a user JWT and its seed, in the `.creds`
    /// format, read from `file`.
    Credentials {
        /// Where they came from.
        file: PathBuf,
        /// The file's text.
        contents: Secret,
    },
}

impl Login {
    /// What the operator gave, in words, for messages: never the secret.
    pub fn described(&self) -> String {
        match self {
            Login::Anonymous => "no credentials".to_string(),
            Login::UserPassword { user, .. } => format!("the password of user {user:?}"),
            Login::Token(_) => "the token".to_string(),
            Login::NKey { file, .. } => format!("the NKey seed in {}", file.display()),
            Login::Credentials { file, .. } => {
                format!("the credentials file {}", file.display())
            }
        }
    }
}

/// How the connection is encrypted and the server checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tls {
    /// TLS even where the URL says `nats://` (a `tls://` URL requires it
    /// for that server anyway).
    pub require: bool,
    /// The CA that signed the servers' certificates (PEM), instead of the
    /// system's roots.
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for servers that verify clients.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

/// Everything about reaching NATS but its addresses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsAuth {
    /// How to log in.
    pub login: Login,
    /// TLS.
    pub tls: Tls,
}

/// Takes the user info out of comma-separated NATS URLs: `user:password@`
/// is a user and password, a lone `token@` a token (as in every NATS
/// client). Returns the URLs without it, safe to print, and the login it
/// gave, if any. Several URLs must give the same one.
pub fn split_credentials(servers: &str) -> Result<(String, Option<Login>), String> {
    let mut clean = Vec::new();
    let mut login: Option<Login> = None;
    for part in servers.split(',').map(str::trim) {
        let addr: async_nats::ServerAddr = part
            .parse()
            .map_err(|e| format!("{}: {e}", redact_servers(part)))?;
        let here = match (addr.username(), addr.password()) {
            (None, _) => None,
            (Some(user), Some(password)) => Some(Login::UserPassword {
                user: decode(user)?,
                password: Secret::new(decode(password)?),
            }),
            (Some(token), None) => Some(Login::Token(Secret::new(decode(token)?))),
        };
        if let Some(here) = here {
            if login.as_ref().is_some_and(|l| *l != here) {
                return Err(format!(
                    "{}: the URLs carry different credentials; give one set (in each URL or in the --nats-user/--nats-password settings)",
                    redact_servers(servers)
                ));
            }
            login = Some(here);
        }
        let mut url = addr.into_inner();
        // Both only fail for URLs that cannot have a user (no host).
        let _ = url.set_username("");
        let _ = url.set_password(None);
        clean.push(url.as_str().to_string());
    }
    Ok((clean.join(","), login))
}

fn decode(text: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "the user info of a NATS URL is not UTF-8 once decoded".to_string())
}

/// NATS URLs with the secret part of their user info replaced by `***`:
/// `nats://app:***@h:4222`, `nats://***@h:4222` (a token).
pub fn redact_servers(servers: &str) -> String {
    servers
        .split(',')
        .map(|part| {
            let (scheme, rest) = part.split_once("://").unwrap_or(("", part));
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let Some((userinfo, host)) = rest[..end].rsplit_once('@') else {
                return part.to_string();
            };
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            let scheme = if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            };
            format!("{scheme}{shown}@{host}{}", &rest[end..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The client options for `auth`: the login, TLS, and no reconnection
/// limit (every caller waits for NATS as long as it takes, once in).
pub(crate) fn options(auth: &NatsAuth, name: String) -> io::Result<ConnectOptions> {
    let mut options = ConnectOptions::new().name(name).max_reconnects(None);
    options = match &auth.login {
        Login::Anonymous => options,
        Login::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_string())
        }
        Login::Token(token) => options.token(token.expose().to_string()),
        Login::NKey { seed, .. } => options.nkey(seed.expose().to_string()),
        Login::Credentials { contents, .. } => options.credentials(contents.expose())?,
    };
    if let Some(ca) = &auth.tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&auth.tls.cert, &auth.tls.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options.require_tls(auth.tls.require))
}

/// Checks what can be checked without a server: the seed parses, the
/// credentials file holds a JWT and a seed, the TLS files exist.
pub fn check(auth: &NatsAuth) -> Result<(), String> {
    match &auth.login {
        Login::NKey { file, seed } => {
            nkeys::KeyPair::from_seed(seed.expose()).map_err(|_| {
                format!(
                    "the NKey seed in {} is not a seed (an NKey seed starts with SU and is 58 characters long)",
                    file.display()
                )
            })?;
        }
        Login::Credentials { file, .. } => {
            options(auth, String::new()).map_err(|e| {
                format!(
                    "the credentials file {} is not a NATS .creds file (a user JWT and its seed): {e}",
                    file.display()
                )
            })?;
        }
        _ => {}
    }
    let files = [
        (&auth.tls.ca, "the NATS CA file (--nats-ca)"),
        (&auth.tls.cert, "the NATS client certificate (--nats-cert)"),
        (&auth.tls.key, "the NATS client key (--nats-key)"),
    ];
    for (path, what) in files {
        if let Some(path) = path {
            std::fs::File::open(path)
                .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        }
    }
    if auth.tls.cert.is_some() != auth.tls.key.is_some() {
        return Err(
            "a NATS client certificate needs its key: give --nats-cert and --nats-key together"
                .into(),
        );
    }
    Ok(())
}

/// Why a connection attempt can never succeed as configured: the server
/// refused the credentials or the TLS handshake failed on a certificate.
/// `None`: a server that is down, unreachable or busy, to be waited for.
pub fn refusal(error: &ConnectError, auth: &NatsAuth, servers: &str) -> Option<String> {
    let login = auth.login.described();
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation => Some(match auth.login {
            Login::Anonymous => format!(
                "the NATS server at {servers} requires credentials (Authorization Violation): give --nats-user and --nats-password, --nats-token, --nats-nkey or --nats-creds (or user:password@ in the URL)"
            ),
            _ => format!(
                "the NATS server at {servers} refused {login} (Authorization Violation): check the credentials and that the server's authorization lists them"
            ),
        }),
        ConnectErrorKind::Authentication => Some(format!(
            "cannot sign the NATS server's nonce with {login}: check that it holds a valid seed"
        )),
        ConnectErrorKind::Tls => Some(format!(
            "cannot set up TLS to the NATS server at {servers}: {}; check --nats-ca, --nats-cert and --nats-key",
            source_text(error)
        )),
        ConnectErrorKind::ServerParse => Some(format!("--nats {servers}: {}", source_text(error))),
        ConnectErrorKind::Io => tls_refusal(error, auth, servers),
        _ => None,
    }
}

/// A TLS handshake that failed on what was said in it (a certificate, an
/// alert, bytes that are not TLS), as opposed to a connection that broke
/// during it: rustls's error, inside the I/O error that async-nats returns.
fn tls_refusal(error: &ConnectError, auth: &NatsAuth, servers: &str) -> Option<String> {
    use async_nats::rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    let io = std::error::Error::source(error)?.downcast_ref::<io::Error>()?;
    let tls = io.get_ref()?.downcast_ref::<Error>()?;
    let why = match tls {
        Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer | Cert::BadSignature => {
                "certificate verify failed: the server's certificate is not signed by a CA this instance trusts; give the CA that signed it with --nats-ca"
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                "certificate verify failed: the server's certificate does not match the host name in the URL; connect by a name (or address) that the certificate lists"
            }
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "certificate verify failed: the server's certificate has expired or is not valid yet"
            }
            _ => "certificate verify failed",
        },
        // Go's TLS server says BadCertificate for a missing certificate too.
        Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::DecryptError,
        ) => {
            if auth.tls.cert.is_none() {
                "the server requires a client certificate: give --nats-cert and --nats-key"
            } else {
                "the server does not accept this instance's client certificate (--nats-cert): it is not signed by a CA the server trusts"
            }
        }
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the server does not offer TLS, but TLS is required (a tls:// URL or --nats-tls)"
        }
        _ => "the TLS handshake failed",
    };
    Some(format!(
        "cannot connect to the NATS server at {servers}: {why} ({tls})"
    ))
}

fn source_text(error: &ConnectError) -> String {
    std::error::Error::source(error).map_or_else(|| error.to_string(), |s| s.to_string())
}

/// A connection that cannot succeed as configured: the sentence that says
/// why and what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Connects, waiting for a server that is down for as long as it takes
/// (logged once, when it starts and when it ends); a refusal ends it at
/// once. `make` builds each attempt's options (they cannot be cloned).
pub(crate) async fn until_connected(
    auth: &NatsAuth,
    servers: &str,
    addrs: &[async_nats::ServerAddr],
    make: impl Fn() -> io::Result<ConnectOptions>,
) -> Result<async_nats::Client, Refused> {
    let mut waiting_since: Option<Instant> = None;
    loop {
        let options = make().map_err(|e| Refused(format!("NATS settings: {e}")))?;
        match options.connect(addrs).await {
            Ok(client) => {
                if let Some(since) = waiting_since {
                    log::info!(
                        "nats: connected to {servers} after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                return Ok(client);
            }
            Err(e) => {
                if let Some(why) = refusal(&e, auth, servers) {
                    return Err(Refused(why));
                }
                if waiting_since.is_none() {
                    log::warn!(
                        "nats: cannot connect to {servers} ({e}); waiting as long as it takes"
                    );
                    waiting_since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_become_a_login_and_leave_the_urls() {
        let (clean, login) =
            split_credentials("nats://app:s%40cret@a:4222, nats://app:s%40cret@b:4223").unwrap();
        assert_eq!(clean, "nats://a:4222,nats://b:4223");
        assert_eq!(
            login,
            Some(Login::UserPassword {
                user: "app".into(),
                password: Secret::new("s@cret")
            })
        );
        let (clean, login) = split_credentials("tls://t0ken@h:4222").unwrap();
        assert_eq!(clean, "tls://h:4222");
        assert_eq!(login, Some(Login::Token(Secret::new("t0ken"))));
        let (clean, login) = split_credentials("h:4222").unwrap();
        assert_eq!((clean.as_str(), login), ("nats://h:4222", None));
        let e = split_credentials("nats://a:x@h:1,nats://a:y@h:2").unwrap_err();
        assert!(
            e.contains("different credentials") && !e.contains(":x@"),
            "{e}"
        );
        let e = split_credentials("nats://a:s3cret@h:port").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn redacted_urls_keep_the_user_and_hide_passwords_and_tokens() {
        assert_eq!(
            redact_servers("nats://app:pw@h:1,tls://tok@h:2/x,nats://h:3"),
            "nats://app:***@h:1,tls://***@h:2/x,nats://h:3"
        );
        assert_eq!(redact_servers("app:pw@h:1"), "app:***@h:1");
    }

    #[test]
    fn a_seed_that_is_not_one_is_named_without_quoting_it() {
        let auth = NatsAuth {
            login: Login::NKey {
                file: "/etc/n.nk".into(),
                seed: Secret::new("SUnotaseed"),
            },
            ..NatsAuth::default()
        };
        let e = check(&auth).unwrap_err();
        assert!(e.contains("/etc/n.nk") && !e.contains("SUnotaseed"), "{e}");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let auth = NatsAuth {
            login: Login::NKey {
                file: "/etc/n.nk".into(),
                seed: Secret::new(seed),
            },
            ..NatsAuth::default()
        };
        check(&auth).unwrap();
    }
}
