//! Redis addresses: `redis://[user[:password]@]host[:port][/db]` (or
//! `redis://:password@…` without a user), or a bare `host:port`. The
//! password never appears in `Display` or `Debug` output. A user without a
//! password (`redis://app@host`) takes its password from a file or the
//! environment (see [`crate::secret`]); with neither, it is refused there
//! (older ferry read `redis://NAME@host` as a password).
//!
//! `rediss://` is the same over TLS ([`super::tls`]); its options follow
//! the address as a query: `rediss://host:6380?tls-ca-file=/etc/ca.pem`
//! `&tls-cert-file=client.pem&tls-key-file=client.key`
//! `&tls-server-name=redis.example` (each optional; values %-escaped where
//! they hold `&`). `Display` shows `rediss://host:port`, without them.

use std::fmt;
use std::path::PathBuf;

/// A parsed Redis address.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`: TLS, with these options.
    pub tls: Option<TlsOptions>,
}

/// How a `rediss://` connection is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// PEM certificates the server's must chain to; default: the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry; default: the host.
    pub server_name: Option<String>,
}

/// Parses `tls-…=value&…` into `options`.
fn parse_tls_query(query: &str, options: &mut TlsOptions) -> Result<(), String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("TLS option {pair:?} has no value"))?;
        let value = percent_decode(value)?;
        if value.is_empty() {
            return Err(format!("TLS option {key} is empty"));
        }
        match key {
            "tls-ca-file" => options.ca_file = Some(PathBuf::from(value)),
            "tls-cert-file" => options.cert_file = Some(PathBuf::from(value)),
            "tls-key-file" => options.key_file = Some(PathBuf::from(value)),
            "tls-server-name" => options.server_name = Some(value),
            other => {
                return Err(format!(
                    "unknown option {other:?} (tls-ca-file, tls-cert-file, tls-key-file, \
                     tls-server-name)"
                ))
            }
        }
    }
    if options.cert_file.is_some() != options.key_file.is_some() {
        return Err("tls-cert-file and tls-key-file go together".to_string());
    }
    Ok(())
}

/// Why an address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad redis address {input:?}: {reason}")]
pub struct UrlError {
    pub input: String,
    pub reason: String,
}

impl RedisUrl {
    pub fn parse(input: &str) -> Result<RedisUrl, UrlError> {
        let fail = |reason: &str| UrlError {
            input: redact(input),
            reason: reason.to_string(),
        };
        let (mut tls, rest) = match input.split_once("://") {
            Some(("redis", rest)) => (None, rest),
            Some(("rediss", rest)) => (Some(TlsOptions::default()), rest),
            Some((scheme, _)) => {
                return Err(fail(&format!(
                    "unsupported scheme {scheme:?} (redis:// or rediss://)"
                )))
            }
            None => (None, input),
        };
        // The options start at `?tls-`: a password may hold a `?`.
        let rest = match rest.find("?tls-") {
            Some(at) => {
                let options = tls
                    .as_mut()
                    .ok_or_else(|| fail("TLS options need a rediss:// address"))?;
                parse_tls_query(&rest[at + 1..], options).map_err(|e| fail(&e))?;
                &rest[..at]
            }
            None => rest,
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(auth) => match auth.split_once(':') {
                Some((user, pass)) => (
                    (!user.is_empty())
                        .then(|| percent_decode(user))
                        .transpose()
                        .map_err(|e| fail(&e))?,
                    Some(percent_decode(pass).map_err(|e| fail(&e))?),
                ),
                // `redis://user@host`: an ACL user whose password comes from
                // elsewhere (a file or the environment), as in other clients.
                None => (Some(percent_decode(auth).map_err(|e| fail(&e))?), None),
            },
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse()
                    .map_err(|_| fail(&format!("bad db index {db:?}")))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
            let (h, p) = stripped
                .split_once(']')
                .ok_or_else(|| fail("unclosed '[' in IPv6 host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(fail("missing host"));
        }
        let port = match port {
            None => 6379,
            Some(p) => p.parse().map_err(|_| fail(&format!("bad port {p:?}")))?,
        };
        Ok(RedisUrl {
            host,
            port,
            user,
            password,
            db,
            tls,
        })
    }

    /// `host:port`, suitable for `TcpStream::connect`.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RedisUrl::parse(s)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tls {
            Some(_) => write!(f, "rediss://")?,
            None => write!(f, "redis://")?,
        }
        match (&self.user, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (None, None) => {}
        }
        write!(f, "{}", self.addr())?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn redact(input: &str) -> String {
    match (input.find("://"), input.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &input[..s + 3], &input[at..]),
        (None, Some(at)) => format!("***{}", &input[at..]),
        _ => input.to_string(),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_addresses() {
        let u = RedisUrl::parse(
            "rediss://app:pw@h:6380/2?tls-ca-file=/etc/ca.pem&tls-cert-file=c.pem&tls-key-file=k%26.pem&tls-server-name=redis.example",
        )
        .unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("h", 6380, 2));
        let tls = u.tls.as_ref().unwrap();
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            tls.key_file.as_deref(),
            Some(std::path::Path::new("k&.pem"))
        );
        assert_eq!(tls.server_name.as_deref(), Some("redis.example"));
        assert_eq!(u.to_string(), "rediss://app:***@h:6380/2");
        let plain = RedisUrl::parse("rediss://h:1").unwrap();
        assert_eq!(plain.tls, Some(TlsOptions::default()));
        // A password may hold a '?'.
        let u = RedisUrl::parse("redis://:a?b@h:1").unwrap();
        assert_eq!(u.password.as_deref(), Some("a?b"));
        for bad in [
            "redis://h:1?tls-ca-file=x",
            "rediss://h:1?tls-cert-file=c.pem",
            "rediss://h:1?tls-colour=blue",
            "rediss://h:1?tls-ca-file=",
            "rediss://h:1?tls-ca-file",
            "http://h:1",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_forms() {
        let u = RedisUrl::parse("redis://admin:p%40ss@127.0.0.1:7000/3").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 7000, 3));
        assert_eq!(u.user.as_deref(), Some("admin"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.to_string(), "redis://admin:***@127.0.0.1:7000/3");

        let u = RedisUrl::parse("localhost:6380").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user, u.password),
            ("localhost", 6380, None, None)
        );

        let u = RedisUrl::parse("redis://:secret@h").unwrap();
        assert_eq!(
            (u.port, u.user, u.password.as_deref()),
            (6379, None, Some("secret"))
        );

        let u = RedisUrl::parse("redis://[::1]:7001").unwrap();
        assert_eq!(u.addr(), "[::1]:7001");

        // A user without a password (it comes from a file or a variable).
        let u = RedisUrl::parse("redis://app@h:1").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.password.as_deref()),
            (Some("app"), None)
        );
        assert_eq!(u.to_string(), "redis://app@h:1");
    }

    #[test]
    fn debug_hides_the_password() {
        let u = RedisUrl::parse("redis://admin:hunter2@127.0.0.1:7000").unwrap();
        assert_eq!(format!("{u:?}"), "redis://admin:***@127.0.0.1:7000");
        let u = RedisUrl::parse("redis://:hunter2@h").unwrap();
        assert!(!format!("{u:?} {u}").contains("hunter2"));
    }

    #[test]
    fn refuses_bad_addresses_without_leaking_passwords() {
        for bad in [
            "http://h:1",
            "redis://:pw@h:notaport",
            "redis://h:1/x",
            "redis://",
            "redis://[::1",
        ] {
            let err = RedisUrl::parse(bad).unwrap_err();
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }
}
