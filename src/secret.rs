//! Secrets (passwords, tokens, NKey seeds): a type that never prints what
//! it holds, and the one way to read one from a file.
//!
//! A secret may come from a flag, an environment variable, the config file
//! or a file named by a `…-file` setting (systemd's `LoadCredential=`
//! hands services such files). Whatever prints a setting, a `Debug` of the
//! settings in a panic message included, prints `***` in its place.

use std::path::Path;

/// A value that must never reach a log, an error message or an output.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one call that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Reads a secret from `path`: the file's text less the line end after it
/// (files written by `echo` end with one). `what` names the setting in the
/// error, which never quotes the file's text.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {what} from {}: {e}", path.display()))?;
    let value = text.strip_suffix('\n').unwrap_or(&text);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(format!("{what} in {} is empty", path.display()));
    }
    Ok(Secret(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_stars_whichever_way_it_is_formatted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_secret_file_loses_its_line_end_and_its_errors_quote_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&path, "x").unwrap().expose(), "s3cret");
        std::fs::write(&path, "two words\r\n").unwrap();
        assert_eq!(read_secret_file(&path, "x").unwrap().expose(), "two words");
        std::fs::write(&path, "\n").unwrap();
        let e = read_secret_file(&path, "the NATS password").unwrap_err();
        assert!(
            e.contains("the NATS password in") && e.contains("is empty"),
            "{e}"
        );
        let e = read_secret_file(&dir.path().join("none"), "the NATS token").unwrap_err();
        assert!(e.starts_with("cannot read the NATS token from"), "{e}");
    }
}
