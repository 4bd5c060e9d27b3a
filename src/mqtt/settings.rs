//! The MQTT source's settings: flags (and their environment variables),
//! then the config file's `[mqtt]` table, then the URL's user info, then
//! the defaults.

use std::path::PathBuf;

use serde::Deserialize;

use super::{parse_url, MqttOptions, DEFAULT_TOPIC};
use crate::secret::{read_secret_file, Secret};

/// The `--mqtt…` flags of `serve`: `None` where not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MqttFlags {
    /// `--mqtt`
    pub url: Option<String>,
    /// `--mqtt-topic`, repeatable.
    pub topics: Vec<String>,
    /// `--mqtt-client-id`
    pub client_id: Option<String>,
    /// `--mqtt-user` or `MQTT_USER`
    pub user: Option<String>,
    /// `--mqtt-password` or `MQTT_PASSWORD`
    pub password: Option<Secret>,
    /// `--mqtt-password-file` or `MQTT_PASSWORD_FILE`
    pub password_file: Option<PathBuf>,
    /// `--mqtt-ca` or `MQTT_CA`
    pub ca: Option<PathBuf>,
    /// `--mqtt-cert` or `MQTT_CERT`
    pub cert: Option<PathBuf>,
    /// `--mqtt-key` or `MQTT_KEY`
    pub key: Option<PathBuf>,
}

/// The `[mqtt]` table of a config file: the flags' keys without `mqtt-`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttFile {
    /// `--mqtt`
    pub url: Option<String>,
    /// `--mqtt-topic`, as a list.
    pub topics: Option<Vec<String>>,
    /// `--mqtt-client-id`
    pub client_id: Option<String>,
    /// `--mqtt-user`
    pub user: Option<String>,
    /// `--mqtt-password`
    pub password: Option<Secret>,
    /// `--mqtt-password-file`
    pub password_file: Option<PathBuf>,
    /// `--mqtt-ca`
    pub ca: Option<PathBuf>,
    /// `--mqtt-cert`
    pub cert: Option<PathBuf>,
    /// `--mqtt-key`
    pub key: Option<PathBuf>,
}

/// The MQTT source's options; none without a broker URL.
pub fn resolve(flags: &MqttFlags, file: Option<&MqttFile>) -> Result<Option<MqttOptions>, String> {
    let empty = MqttFile::default();
    let file = file.unwrap_or(&empty);
    let Some(url) = flags.url.clone().or(file.url.clone()) else {
        return Ok(None);
    };
    let url = parse_url(&url).map_err(|e| format!("--mqtt: {e}"))?;
    let password = secret(
        flags.password.clone(),
        flags.password_file.as_ref(),
        "--mqtt-password",
    )?
    .or(secret(
        file.password.clone(),
        file.password_file.as_ref(),
        "mqtt.password",
    )?)
    .or(url.password);
    let user = flags.user.clone().or(file.user.clone()).or(url.user);
    let login = match (user, password) {
        (Some(user), Some(password)) => Some((user, password)),
        (Some(user), None) => Some((user, Secret::new(""))),
        (None, Some(_)) => {
            return Err(
                "an MQTT password needs its user: --mqtt-user or mqtt://USER:PASSWORD@host".into(),
            )
        }
        (None, None) => None,
    };
    let ca = flags.ca.clone().or(file.ca.clone());
    let client_cert = match (
        flags.cert.clone().or(file.cert.clone()),
        flags.key.clone().or(file.key.clone()),
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--mqtt-cert and --mqtt-key go together".into()),
    };
    let mut topics = if flags.topics.is_empty() {
        file.topics.clone().unwrap_or_default()
    } else {
        flags.topics.clone()
    };
    if topics.is_empty() {
        topics.push(DEFAULT_TOPIC.to_string());
    }
    for topic in &topics {
        check_filter(topic)?;
    }
    let client_id = flags
        .client_id
        .clone()
        .or(file.client_id.clone())
        .unwrap_or_else(default_client_id);
    if client_id.is_empty() || client_id.len() > 256 {
        return Err("--mqtt-client-id must hold 1 to 256 characters".into());
    }
    Ok(Some(MqttOptions {
        tls: url.tls || ca.is_some() || client_cert.is_some(),
        host: url.host,
        port: url.port,
        topics,
        client_id,
        login,
        ca,
        client_cert,
    }))
}

/// A secret given directly or as a file; both is an error.
fn secret(
    value: Option<Secret>,
    file: Option<&PathBuf>,
    flag: &str,
) -> Result<Option<Secret>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("{flag} and its file form both set; keep one")),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(path, "the MQTT password").map(Some),
        (None, None) => Ok(None),
    }
}

/// A topic filter as MQTT 3.1.1 section 4.7 allows it: `#` only last and
/// alone in its level, `+` alone in its level.
fn check_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let bad = filter.is_empty()
        || filter.len() > 65535
        || filter.contains('\0')
        || levels.iter().enumerate().any(|(i, level)| {
            (level.contains('#') && (*level != "#" || i + 1 != levels.len()))
                || (level.contains('+') && *level != "+")
        });
    if bad {
        return Err(format!(
            "--mqtt-topic {filter:?} is not a topic filter (# only as the last level, + alone in a level)"
        ));
    }
    Ok(())
}

/// `normalizer-<host name>`: the same on every start of the service on
/// this host, so the broker keeps its session.
fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "normalizer".to_string()
    } else {
        format!("normalizer-{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(url: &str) -> MqttFlags {
        MqttFlags {
            url: Some(url.into()),
            ..MqttFlags::default()
        }
    }

    #[test]
    fn flags_come_before_the_file_and_the_file_before_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file\n").unwrap();
        let file = MqttFile {
            user: Some("file-user".into()),
            password_file: Some(pw.clone()),
            topics: Some(vec!["a/#".into()]),
            ..MqttFile::default()
        };
        let o = resolve(&flags("mqtt://u:url-pw@h"), Some(&file))
            .unwrap()
            .unwrap();
        let (user, password) = o.login.unwrap();
        assert_eq!(
            (user.as_str(), password.expose()),
            ("file-user", "from-file")
        );
        assert_eq!(o.topics, ["a/#"]);
        let mut f = flags("mqtt://u:url-pw@h");
        f.topics = vec!["b/+".into(), "c".into()];
        f.user = Some("flag-user".into());
        let o = resolve(&f, Some(&file)).unwrap().unwrap();
        assert_eq!(o.login.unwrap().0, "flag-user");
        assert_eq!(o.topics, ["b/+", "c"]);
        let o = resolve(&flags("mqtt://u:url-pw@h"), None).unwrap().unwrap();
        assert_eq!(o.login.as_ref().unwrap().1.expose(), "url-pw");
        assert_eq!(o.topics, [DEFAULT_TOPIC]);
        assert!(o.client_id.starts_with("normalizer"));
        assert_eq!(o.address(), "mqtt://h:1883");
    }

    #[test]
    fn mistakes_are_one_sentence_each() {
        assert_eq!(resolve(&MqttFlags::default(), None), Ok(None));
        let mut f = flags("mqtt://h");
        f.topics = vec!["a/#/b".into()];
        assert!(resolve(&f, None)
            .unwrap_err()
            .contains("not a topic filter"));
        f.topics = vec!["a+/b".into()];
        assert!(resolve(&f, None)
            .unwrap_err()
            .contains("not a topic filter"));
        let mut f = flags("mqtt://h");
        f.cert = Some("c.pem".into());
        assert!(resolve(&f, None).unwrap_err().contains("go together"));
        let mut f = flags("mqtt://h");
        f.password = Some(Secret::new("x"));
        assert!(resolve(&f, None).unwrap_err().contains("needs its user"));
        let mut f = flags("mqtt://h");
        f.ca = Some("ca.pem".into());
        assert!(resolve(&f, None).unwrap().unwrap().tls, "a CA means TLS");
    }
}
