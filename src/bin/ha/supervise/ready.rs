//! When the supervised child counts as ready: once started, or once a TCP port accepts a
//! connection, or once an HTTP URL answers 2xx. The same checks tell, later, whether it
//! still answers (`health.rs`).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

/// How often a probe is tried, and how long one try may take.
const EVERY: Duration = Duration::from_millis(100);
const ONE_TRY: Duration = Duration::from_secs(1);
/// The most of a response read: the status line is all that matters.
const MAX_STATUS_LINE: u64 = 4 * 1024;

/// The readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Ready when started.
    Started,
    /// Ready when `host:port` accepts a TCP connection.
    Tcp(String),
    /// Ready when `GET path` on `host:port` answers 2xx.
    Http {
        /// `host:port`.
        authority: String,
        /// The path and query, from `/`.
        path: String,
    },
}

impl Probe {
    /// `--ready-tcp HOST:PORT` or `--ready-http http://HOST:PORT/PATH` (at most one).
    pub fn parse(tcp: Option<&str>, http: Option<&str>) -> Result<Self, String> {
        Self::parse_flags("ready", tcp, http)
    }

    /// `--{kind}-tcp` or `--{kind}-http` (at most one), errors naming those flags.
    pub fn parse_flags(kind: &str, tcp: Option<&str>, http: Option<&str>) -> Result<Self, String> {
        match (tcp, http) {
            (None, None) => Ok(Self::Started),
            (Some(_), Some(_)) => Err(format!("give --{kind}-tcp or --{kind}-http, not both")),
            (Some(addr), None) => {
                if addr
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                {
                    Ok(Self::Tcp(addr.to_owned()))
                } else {
                    Err(format!("--{kind}-tcp {addr:?} is not HOST:PORT"))
                }
            }
            (None, Some(url)) => {
                let rest = url.strip_prefix("http://").ok_or_else(|| {
                    format!("--{kind}-http {url:?}: only http:// URLs are probed")
                })?;
                let (authority, path) = match rest.find('/') {
                    Some(at) => (&rest[..at], &rest[at..]),
                    None => (rest, "/"),
                };
                let authority = if authority.contains(':') {
                    authority.to_owned()
                } else {
                    format!("{authority}:80")
                };
                if authority.starts_with(':') || path.contains(char::is_whitespace) {
                    return Err(format!(
                        "--{kind}-http {url:?} is not http://HOST[:PORT]/PATH"
                    ));
                }
                Ok(Self::Http {
                    authority,
                    path: path.to_owned(),
                })
            }
        }
    }

    /// Tries until the probe passes (bounded by the caller).
    pub async fn wait(&self) {
        while !self.passes(ONE_TRY).await {
            sleep(EVERY).await;
        }
    }

    /// One try, bounded by `within`: whether the port accepted, or the URL answered 2xx.
    pub async fn passes(&self, within: Duration) -> bool {
        match self {
            Self::Started => true,
            Self::Tcp(addr) => timeout(within, TcpStream::connect(addr.as_str()))
                .await
                .is_ok_and(|c| c.is_ok()),
            Self::Http { authority, path } => timeout(within, http_ok(authority, path))
                .await
                .unwrap_or(false),
        }
    }
}

async fn http_ok(authority: &str, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(authority).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line decides; a server that keeps the connection open after it is
    // still ready.
    let mut status = String::new();
    let mut reader = tokio::io::BufReader::new((&mut stream).take(MAX_STATUS_LINE));
    if reader.read_line(&mut status).await.is_err() {
        return false;
    }
    status
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| (200..300).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_or_say_what_is_wrong() {
        assert_eq!(Probe::parse(None, None), Ok(Probe::Started));
        assert_eq!(
            Probe::parse(Some("127.0.0.1:9000"), None),
            Ok(Probe::Tcp("127.0.0.1:9000".into()))
        );
        assert_eq!(
            Probe::parse(None, Some("http://localhost:8080/healthz")),
            Ok(Probe::Http {
                authority: "localhost:8080".into(),
                path: "/healthz".into()
            })
        );
        assert_eq!(
            Probe::parse(None, Some("http://localhost")),
            Ok(Probe::Http {
                authority: "localhost:80".into(),
                path: "/".into()
            })
        );
        assert!(Probe::parse(Some("nohost"), None).is_err());
        assert!(Probe::parse(None, Some("https://x/")).is_err());
        assert!(Probe::parse(Some("a:1"), Some("http://a/")).is_err());
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_2xx_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let listener = listener.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            for status in ["503 Service Unavailable", "200 OK"] {
                if let Ok((mut stream, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                    // Kept open: the status line alone must decide.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(stream);
                    });
                }
            }
        });
        let authority = addr.to_string();
        let probe = |authority: String| async move {
            timeout(Duration::from_secs(5), http_ok(&authority, "/")).await
        };
        assert_eq!(probe(authority.clone()).await, Ok(false));
        assert_eq!(probe(authority).await, Ok(true));
    }
}
