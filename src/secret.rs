//! Secrets in configs and flags, and private data on disk.
//!
//! In: the secrets a config or the command line gives (the password inside
//! a Redis URL, the listener ↔ drainer shared secret), written inline, in a
//! file or in an environment variable. Out: [`Secret`] and [`SecretUrl`],
//! whose `Debug` and `Serialize` show `***` instead of the secret (so a
//! logged or printed config never carries it), and the plain value only
//! through [`Secret::expose`] / [`SecretUrl::parse_with`].
//!
//! # Where a secret comes from (one place at a time)
//!
//! | key / flag | what it holds |
//! |---|---|
//! | `secret = "…"`, `redis://user:password@host` | the secret itself: readable by anyone who reads the file, and on a command line by anyone who runs `ps` |
//! | `secret-file`, `source-password-file`, `target-password-file`, `--source-password-file`, `--target-password-file` | a file holding it (its content, one trailing newline dropped) |
//! | `secret-env`, `source-password-env`, `target-password-env` | the name of an environment variable holding it |
//! | `FERRY_SOURCE_PASSWORD`, `FERRY_TARGET_PASSWORD` | read by the command-line verbs (`sync`, `precheck`, `rdb fetch`, `rdb load`, `verify`) when set |
//!
//! Two places for one secret (a URL with a password and a password file, a
//! `secret` and a `secret-env`, a password file and `FERRY_SOURCE_PASSWORD`)
//! is refused, naming both: which one wins would be a guess. A URL may name
//! an ACL user without a password (`redis://user@host`) and take the
//! password from a file or the environment.
//!
//! Directories ferry creates for its data (data dirs, WAL dirs) are private
//! to its user: [`create_private_dir`] makes them mode 0700.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::redis::url::{RedisUrl, UrlError};

/// What `Debug` and `Serialize` show in place of a secret.
pub const REDACTED: &str = "***";

/// Environment variable the command-line verbs read the source's password
/// from.
pub const SOURCE_PASSWORD_ENV: &str = "FERRY_SOURCE_PASSWORD";
/// Environment variable the command-line verbs read the target's password
/// from.
pub const TARGET_PASSWORD_ENV: &str = "FERRY_TARGET_PASSWORD";

/// A secret string (the listener ↔ drainer shared secret): shown as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (authentication).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its length in bytes (checked against minimums; not secret enough to
    /// hide).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `given` is this secret, compared in time that depends on the
    /// lengths only (a bearer token checked by a server).
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// A Redis address as written in a config or a flag, which may hold a
/// password (`redis://user:password@host:port`): `Debug` and `Serialize`
/// show it with the password as `***`. It derefs to the text, for parsing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> SecretUrl {
        SecretUrl(value.into())
    }

    /// The address for logs and errors: the password replaced by `***`.
    pub fn redacted(&self) -> String {
        match RedisUrl::parse(&self.0) {
            Ok(url) => url.to_string(),
            // Not a URL: show nothing of it that could be a password.
            Err(error) => error.input,
        }
    }

    /// Parses the address and sets its password from `password` (a file
    /// or an environment variable), refusing a URL that holds one already.
    pub fn parse_with(&self, password: &PasswordSource) -> Result<RedisUrl, SecretError> {
        let mut url = RedisUrl::parse(&self.0).map_err(SecretError::Url)?;
        if let Some(found) = password.read()? {
            if url.password.is_some() {
                return Err(SecretError::Twice {
                    first: "the URL".to_string(),
                    second: password.describe(),
                });
            }
            url.password = Some(found);
        }
        if url.user.is_some() && url.password.is_none() {
            // The name is not shown: `redis://secret@host` used to mean a
            // password.
            return Err(SecretError::UserWithoutPassword {
                url: format!("redis://***@{}", url.addr()),
            });
        }
        Ok(url)
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretUrl {
    fn from(value: String) -> SecretUrl {
        SecretUrl(value)
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> SecretUrl {
        SecretUrl(value.to_string())
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<SecretUrl, Self::Err> {
        Ok(SecretUrl(s.to_string()))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretUrl)
    }
}

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the {what} {path}: {error}")]
    ReadFile {
        what: String,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the {what} {path} is empty")]
    EmptyFile { what: String, path: PathBuf },
    #[error("environment variable {name} ({what}) is not set")]
    EnvMissing { what: String, name: String },
    #[error("environment variable {name} ({what}) is empty or not UTF-8")]
    EnvEmpty { what: String, name: String },
    #[error("{first} and {second} both give it; give it once")]
    Twice { first: String, second: String },
    #[error(transparent)]
    Url(UrlError),
    /// `redis://NAME@host` with no password anywhere: older ferry read NAME
    /// as the password, so it is not shown.
    #[error(
        "{url} names a user but no password: write redis://:PASSWORD@host for a password alone, \
         or give the user's password from a file or an environment variable"
    )]
    UserWithoutPassword { url: String },
}

/// Where a secret that is not written inline comes from: at most one of a
/// file and an environment variable (the config keys `<name>-file` and
/// `<name>-env`, or a flag and an implicit variable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordSource {
    /// A file holding the secret; `(key or flag, path)`.
    pub file: Option<(String, PathBuf)>,
    /// An environment variable holding the secret; `(key, variable name)`.
    pub env: Option<(String, String)>,
}

impl PasswordSource {
    pub fn none() -> PasswordSource {
        PasswordSource::default()
    }

    /// From the two config keys `<key>-file` and `<key>-env` of `key`.
    pub fn from_keys(key: &str, file: Option<&Path>, env: Option<&str>) -> PasswordSource {
        PasswordSource {
            file: file.map(|p| (format!("{key}-file"), p.to_path_buf())),
            env: env.map(|e| (format!("{key}-env"), e.to_string())),
        }
    }

    /// For command-line verbs: `--<flag>` (a file) and the variable
    /// `implicit_env`, which counts only when it is set.
    pub fn from_flag(flag: &str, file: Option<&Path>, implicit_env: &str) -> PasswordSource {
        PasswordSource {
            file: file.map(|p| (format!("--{flag}"), p.to_path_buf())),
            env: std::env::var_os(implicit_env)
                .map(|_| (implicit_env.to_string(), implicit_env.to_string())),
        }
    }

    pub fn is_given(&self) -> bool {
        self.file.is_some() || self.env.is_some()
    }

    fn describe(&self) -> String {
        match (&self.file, &self.env) {
            (Some((key, path)), _) => format!("{key} ({})", path.display()),
            (None, Some((key, name))) if key == name => format!("the environment ({name})"),
            (None, Some((key, name))) => format!("{key} ({name})"),
            (None, None) => "nowhere".to_string(),
        }
    }

    /// Reads the secret, if one is given; refuses both a file and a
    /// variable.
    pub fn read(&self) -> Result<Option<String>, SecretError> {
        match (&self.file, &self.env) {
            (Some((key, _)), Some((env_key, name))) => Err(SecretError::Twice {
                first: key.clone(),
                second: if env_key == name {
                    format!("the environment ({name})")
                } else {
                    env_key.clone()
                },
            }),
            (Some((key, path)), None) => read_secret_file(key, path).map(Some),
            (None, Some((key, name))) => match std::env::var_os(name) {
                None => Err(SecretError::EnvMissing {
                    what: key.clone(),
                    name: name.clone(),
                }),
                Some(value) => match value.into_string() {
                    Ok(value) if !value.is_empty() => Ok(Some(value)),
                    _ => Err(SecretError::EnvEmpty {
                        what: key.clone(),
                        name: name.clone(),
                    }),
                },
            },
            (None, None) => Ok(None),
        }
    }
}

impl PasswordSource {
    /// Fills `inline` (a secret written as `inline_key = "…"`, empty when
    /// not written) from the file or variable, if one is given; refuses
    /// both an inline secret and another source.
    pub fn resolve_into(&self, inline: &mut Secret, inline_key: &str) -> Result<(), SecretError> {
        if !self.is_given() {
            return Ok(());
        }
        if !inline.is_empty() {
            return Err(SecretError::Twice {
                first: inline_key.to_string(),
                second: self.describe(),
            });
        }
        if let Some(value) = self.read()? {
            *inline = Secret(value);
        }
        Ok(())
    }
}

/// A Redis address given on the command line could not be used.
#[derive(Debug, thiserror::Error)]
#[error("--{which}: {error}")]
pub struct FlagUrlError {
    /// `source` or `target`.
    pub which: &'static str,
    #[source]
    pub error: SecretError,
}

/// The address of a command-line verb's `--source` or `--target` (`which`),
/// its password read from `--<which>-password-file` or, when set, from
/// `FERRY_SOURCE_PASSWORD` / `FERRY_TARGET_PASSWORD`.
pub fn url_from_flags(
    which: &'static str,
    url: &SecretUrl,
    password_file: Option<&Path>,
) -> Result<RedisUrl, FlagUrlError> {
    let env = match which {
        "source" => SOURCE_PASSWORD_ENV,
        _ => TARGET_PASSWORD_ENV,
    };
    let flag = format!("{which}-password-file");
    url.parse_with(&PasswordSource::from_flag(&flag, password_file, env))
        .map_err(|error| FlagUrlError { which, error })
}

/// Shortest bearer token an API takes: a guess is no way in.
pub const TOKEN_MIN_LEN: usize = 16;

/// Reads a bearer token file (`ferry serve --token-file`, the admin API's
/// `admin-token-file`): at least [`TOKEN_MIN_LEN`] characters, no spaces.
/// Errors name `what` (the flag or key) and the file.
pub fn read_token_file(what: &str, path: &Path) -> Result<Secret, String> {
    let token = read_secret_file(what, path).map_err(|e| e.to_string())?;
    if token.len() < TOKEN_MIN_LEN || token.contains(char::is_whitespace) {
        return Err(format!(
            "{what} {}: the token must be at least {TOKEN_MIN_LEN} characters, without spaces",
            path.display()
        ));
    }
    Ok(Secret::new(token))
}

/// A secret file's content, without one trailing `\n` or `\r\n`.
pub fn read_secret_file(what: &str, path: &Path) -> Result<String, SecretError> {
    use std::io::Read;
    // A password or token is short: a bigger file is not one (a device,
    // a log named by mistake), and is not read whole.
    const SECRET_FILE_MAX: u64 = 64 * 1024;
    let fail = |error: std::io::Error| SecretError::ReadFile {
        what: what.to_string(),
        path: path.to_path_buf(),
        error,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(SECRET_FILE_MAX + 1).read_to_end(&mut bytes))
        .map_err(fail)?;
    if bytes.len() as u64 > SECRET_FILE_MAX {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {SECRET_FILE_MAX} bytes: not a secret"),
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(SecretError::EmptyFile {
            what: what.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok(text.to_string())
}

/// Creates `dir` and any missing parent with mode 0700 (before the umask):
/// ferry's data dirs and WAL dirs hold the replicated data. An existing
/// directory keeps its mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        let token = Secret::new("abc");
        assert!(token.matches("abc"));
        assert!(!token.matches("abd"));
        assert!(!token.matches("abcd"));
        assert!(!token.matches(""));
    }

    #[test]
    fn debug_and_serialize_redact() {
        let secret = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
        assert_eq!(secret.expose(), "hunter2-hunter2");
        let url = SecretUrl::from("redis://admin:hunter2@10.0.0.1:6380/2");
        assert_eq!(format!("{url:?}"), "\"redis://admin:***@10.0.0.1:6380/2\"");
        assert_eq!(
            serde_json::to_string(&url).unwrap(),
            "\"redis://admin:***@10.0.0.1:6380/2\""
        );
        let bad = SecretUrl::from("redis://:hunter2@host:notaport");
        assert!(!format!("{bad:?}").contains("hunter2"), "{bad:?}");
        assert!(!bad.redacted().contains("hunter2"));
        // Deserialized from the plain text.
        let back: SecretUrl = serde_json::from_str("\"redis://:pw@h:1\"").unwrap();
        assert_eq!(&*back, "redis://:pw@h:1");
        let back: Secret = serde_json::from_str("\"s3cret-s3cret\"").unwrap();
        assert_eq!(back.expose(), "s3cret-s3cret");
    }

    #[test]
    fn files_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "p@ss word\r\n").unwrap();
        let from_file = PasswordSource::from_keys("source-password", Some(&file), None);
        assert_eq!(from_file.read().unwrap().as_deref(), Some("p@ss word"));
        std::fs::write(&file, "").unwrap();
        let err = from_file.read().unwrap_err().to_string();
        assert!(
            err.contains("source-password-file") && err.contains("empty"),
            "{err}"
        );
        let missing = PasswordSource::from_keys("x", Some(&dir.path().join("none")), None);
        assert!(missing
            .read()
            .unwrap_err()
            .to_string()
            .contains("cannot read"));

        // A variable every environment has (setting one in a threaded
        // test process would race with other threads' getenv).
        let var = "PATH";
        let value = std::env::var(var).unwrap();
        let from_env = PasswordSource::from_keys("target-password", None, Some(var));
        assert_eq!(from_env.read().unwrap(), Some(value));
        let both = PasswordSource::from_keys("target-password", Some(&file), Some(var));
        let err = both.read().unwrap_err().to_string();
        assert!(
            err.contains("target-password-file") && err.contains("target-password-env"),
            "{err}"
        );
        let unset = PasswordSource::from_keys("k", None, Some("FERRY_SECRET_TEST_UNSET_2"));
        let err = unset.read().unwrap_err().to_string();
        assert!(
            err.contains("FERRY_SECRET_TEST_UNSET_2") && err.contains("not set"),
            "{err}"
        );

        // A URL with a password and a file: refused.
        std::fs::write(&file, "pw\n").unwrap();
        let source = PasswordSource::from_keys("source-password", Some(&file), None);
        let err = SecretUrl::from("redis://:inline@h:1")
            .parse_with(&source)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the URL") && err.contains("source-password-file"),
            "{err}"
        );
        assert!(!err.contains("inline"), "{err}");
        // An ACL user in the URL, its password from the file.
        let url = SecretUrl::from("redis://app@h:1")
            .parse_with(&source)
            .unwrap();
        assert_eq!(url.user.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("pw"));
    }

    #[test]
    fn a_user_without_a_password_is_refused_without_showing_it() {
        let none = PasswordSource::default();
        let error = SecretUrl::from("redis://hunter2-hunter2@127.0.0.1:6379")
            .parse_with(&none)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("redis://***@127.0.0.1:6379"), "{error}");
        let password_alone = SecretUrl::from("redis://:hunter2@127.0.0.1:6379")
            .parse_with(&none)
            .unwrap();
        assert_eq!(password_alone.password.as_deref(), Some("hunter2"));
    }

    #[test]
    fn private_dirs_are_0700() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        create_private_dir(&nested).unwrap();
        for d in [dir.path().join("a"), nested.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        create_private_dir(&nested).unwrap();
    }
}
