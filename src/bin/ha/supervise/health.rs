//! Whether a ready command still answers: `--health-tcp` or `--health-http`, tried every
//! `--health-interval`. A command that stopped answering while its process lives (a
//! deadlock, a full disk, a stuck event loop) would otherwise hold the role for good;
//! after `--health-failures` failed tries in a row the supervisor stops it and resigns,
//! so a standby takes over in milliseconds instead of never.

use std::time::Duration;

use tokio::time::sleep;

use super::ready::Probe;

/// The longest one try may take, whatever the interval.
const MAX_TRY: Duration = Duration::from_secs(1);
/// No interval below this: a probe is a connection to the command each time.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The most failed tries in a row that may be asked for.
pub const MAX_FAILURES: u32 = 1000;

/// The health check of a ready command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    probe: Probe,
    every: Duration,
    failures: u32,
}

impl Health {
    /// The check `--health-tcp` / `--health-http` ask for, tried every `interval`
    /// seconds, failing after `failures` failed tries in a row; `None` without either
    /// flag.
    pub fn parse(
        tcp: Option<&str>,
        http: Option<&str>,
        interval: f64,
        failures: u32,
    ) -> Result<Option<Self>, String> {
        let probe = Probe::parse_flags("health", tcp, http)?;
        if probe == Probe::Started {
            return Ok(None);
        }
        let every = Duration::try_from_secs_f64(interval)
            .ok()
            .filter(|every| (MIN_INTERVAL..=Duration::from_secs(3600)).contains(every))
            .ok_or_else(|| format!("--health-interval {interval} s is outside [0.01, 3600]"))?;
        if !(1..=MAX_FAILURES).contains(&failures) {
            return Err(format!(
                "--health-failures {failures} is outside [1, {MAX_FAILURES}]"
            ));
        }
        Ok(Some(Self {
            probe,
            every,
            failures,
        }))
    }

    /// How long one try may take: the interval (so tries never pile up), at most 1 s.
    fn one_try(&self) -> Duration {
        self.every.min(MAX_TRY)
    }

    /// Resolves once `failures` tries in a row failed (pending while they pass).
    pub async fn failing(&self) -> u32 {
        let mut failed = 0;
        loop {
            sleep(self.every).await;
            if self.probe.passes(self.one_try()).await {
                failed = 0;
            } else {
                failed += 1;
                tracing::debug!(failed, of = self.failures, "health probe failed");
                if failed >= self.failures {
                    return failed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_or_say_what_is_wrong() {
        assert_eq!(Health::parse(None, None, 1.0, 3), Ok(None));
        let health = Health::parse(Some("127.0.0.1:9000"), None, 0.2, 3)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no check"));
        assert_eq!(health.one_try(), Duration::from_millis(200));
        for (tcp, http, interval, failures, says) in [
            (Some("a:1"), Some("http://a/"), 1.0, 3, "not both"),
            (None, Some("https://a/"), 1.0, 3, "--health-http"),
            (Some("a"), None, 1.0, 3, "--health-tcp"),
            (Some("a:1"), None, 0.001, 3, "--health-interval"),
            (Some("a:1"), None, 1.0, 0, "--health-failures"),
            (Some("a:1"), None, f64::NAN, 3, "--health-interval"),
        ] {
            let error = Health::parse(tcp, http, interval, failures).err();
            assert!(
                error.as_deref().is_some_and(|e| e.contains(says)),
                "{error:?} should say {says}"
            );
        }
    }

    #[tokio::test]
    async fn a_port_that_stops_accepting_fails_after_the_tries_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let health = Health::parse(Some(&addr.to_string()), None, 0.05, 3)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no check"));
        // Passing: still pending after many intervals.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), health.failing())
                .await
                .is_err()
        );
        drop(listener);
        let failed = tokio::time::timeout(Duration::from_secs(5), health.failing()).await;
        assert_eq!(failed, Ok(3));
    }
}
