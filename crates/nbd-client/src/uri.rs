//! NBD URIs (NBD spec doc/uri.md): `nbd://`, `nbds://`, `nbd+unix://`,
//! `nbds+unix://`, with `?socket=PATH`, IPv6 literals in brackets and the
//! export name taken from the path minus one leading `/`, percent-decoded.

use std::fmt;
use std::path::PathBuf;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    pub export: String,
    /// `nbds` schemes: TLS is required.
    pub tls: bool,
    /// The userinfo part (a TLS user name).
    pub user: Option<String>,
    /// Query parameters other than `socket`, kept for the TLS layer.
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not an NBD URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://): {0}")]
    Scheme(String),
    #[error("bad percent-encoding in URI")]
    Percent,
    #[error("bad port '{0}'")]
    Port(String),
    #[error("unterminated IPv6 literal")]
    Ipv6,
    #[error("nbd+unix URI needs ?socket=PATH")]
    NoSocket,
    #[error("socket= is only allowed with +unix schemes")]
    SocketOnTcp,
    #[error("unix socket URIs take no host or port")]
    HostOnUnix,
    #[error("TCP URI needs a host")]
    NoHost,
    #[error("unknown query parameter '{0}'")]
    UnknownParam(String),
}

impl NbdUri {
    /// True if `s` looks like an NBD URI (as opposed to a file name).
    pub fn is_uri(s: &str) -> bool {
        [
            "nbd://",
            "nbds://",
            "nbd+unix://",
            "nbds+unix://",
            "nbd+tcp://",
        ]
        .iter()
        .any(|p| s.starts_with(p))
    }

    pub fn parse(s: &str) -> Result<Self, UriError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| UriError::Scheme(s.to_string()))?;
        let (tls, unix) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::Scheme(s.to_string())),
        };
        // Fragment is meaningless here; drop it.
        let rest = rest.split('#').next().unwrap_or("");
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u)?), h),
            None => (None, authority),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;

        let mut socket = None;
        let mut params = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k)?, percent_decode(v)?);
            match k.as_str() {
                "socket" => socket = Some(v),
                "tls-type" | "tls-hostname" | "tls-verify-peer" | "tls-certificates"
                | "tls-psk-file" => params.push((k, v)),
                _ if k.starts_with("x-") => params.push((k, v)),
                _ => return Err(UriError::UnknownParam(k)),
            }
        }

        let transport = if unix {
            if !hostport.is_empty() {
                return Err(UriError::HostOnUnix);
            }
            Transport::Unix {
                path: PathBuf::from(socket.ok_or(UriError::NoSocket)?),
            }
        } else {
            if socket.is_some() {
                return Err(UriError::SocketOnTcp);
            }
            let (host, port) = split_host_port(hostport)?;
            if host.is_empty() {
                return Err(UriError::NoHost);
            }
            Transport::Tcp { host, port }
        };
        Ok(NbdUri {
            transport,
            export,
            tls,
            user,
            params,
        })
    }
}

fn split_host_port(s: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(UriError::Ipv6)?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UriError::Port(p.to_string()))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (percent_decode(h)?, Some(p)),
            None => (percent_decode(s)?, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| UriError::Port(p.to_string()))?,
    };
    Ok((host, port))
}

/// RFC 3986 percent-decoding; the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UriError::Percent)?;
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::Percent)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::Percent)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Percent)
}

fn percent_encode_path(s: &str, out: &mut String) {
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:@!$&'()*+,;=".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        let mut out = String::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                out.push_str(&format!("{s}://{host}"));
                if *port != DEFAULT_PORT {
                    out.push_str(&format!(":{port}"));
                }
                out.push('/');
                percent_encode_path(&self.export, &mut out);
            }
            Transport::Unix { path } => {
                out.push_str(&format!("{s}+unix:///"));
                percent_encode_path(&self.export, &mut out);
                out.push_str("?socket=");
                percent_encode_path(&path.to_string_lossy(), &mut out);
            }
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn export_names() {
        let cases = [
            ("nbd://h/disk", "disk"),
            ("nbd://h/", ""),
            ("nbd://h", ""),
            ("nbd://h//disk", "/disk"),
            ("nbd://h/hello%20world", "hello world"),
            ("nbd://h/a/b?", "a/b"),
        ];
        for (uri, export) in cases {
            let u = NbdUri::parse(uri).unwrap();
            assert_eq!(u.export, export, "{uri}");
            assert_eq!(u.transport, tcp("h", DEFAULT_PORT));
        }
    }

    #[test]
    fn hosts_and_ports() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:1234/x").unwrap().transport,
            tcp("127.0.0.1", 1234)
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/").unwrap().transport,
            tcp("::1", 99)
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]").unwrap().transport,
            tcp("fe80::1", DEFAULT_PORT)
        );
        let u = NbdUri::parse("nbds://alice@example.com/e").unwrap();
        assert!(u.tls);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.transport, tcp("example.com", DEFAULT_PORT));
        assert!(matches!(
            NbdUri::parse("nbd://h:99999/"),
            Err(UriError::Port(_))
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h:x/"),
            Err(UriError::Port(_))
        ));
        assert!(matches!(NbdUri::parse("nbd://[::1/"), Err(UriError::Ipv6)));
        assert!(matches!(NbdUri::parse("nbd:///x"), Err(UriError::NoHost)));
    }

    #[test]
    fn unix_sockets() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/tmp/s%20x.sock").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                path: "/tmp/s x.sock".into()
            }
        );
        assert_eq!(u.export, "disk");
        assert!(!u.tls);
        assert!(NbdUri::parse("nbds+unix:///?socket=/s").unwrap().tls);
        assert_eq!(NbdUri::parse("nbd+unix://?socket=/s").unwrap().export, "");
        assert!(matches!(
            NbdUri::parse("nbd+unix:///x"),
            Err(UriError::NoSocket)
        ));
        assert!(matches!(
            NbdUri::parse("nbd+unix://h/x?socket=/s"),
            Err(UriError::HostOnUnix)
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h/x?socket=/s"),
            Err(UriError::SocketOnTcp)
        ));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            NbdUri::parse("http://h/"),
            Err(UriError::Scheme(_))
        ));
        assert!(matches!(
            NbdUri::parse("/tmp/file"),
            Err(UriError::Scheme(_))
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h/%zz"),
            Err(UriError::Percent)
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h/%4"),
            Err(UriError::Percent)
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h/%ff"),
            Err(UriError::Percent)
        ));
        assert!(matches!(
            NbdUri::parse("nbd://h/?bogus=1"),
            Err(UriError::UnknownParam(_))
        ));
        // TLS parameters parse (TLS itself is refused when connecting).
        let u = NbdUri::parse("nbds://h/?tls-certificates=/d&x-foo=1").unwrap();
        assert_eq!(u.params.len(), 2);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://127.0.0.1:1234/disk",
            "nbd://[::1]/a%20b",
            "nbd+unix:///e?socket=/tmp/x.sock",
            "nbds://h/",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
