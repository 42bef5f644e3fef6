//! The TLS material a client trusts and presents, the same for every backend: read from
//! PEM files with one check and one error, so a bad file says the same thing whether it
//! was meant for `raft://` or `etcd://`.

use std::path::Path;

use crate::error::{Error, Result};

/// The CA certificate(s) a client trusts and, for mutual TLS, its own certificate chain
/// and private key, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA certificate(s) that sign the servers' certificates.
    pub ca_pem: Vec<u8>,
    /// This client's certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    // Key material stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the CA and, if given, the client certificate and key from PEM files.
    ///
    /// # Errors
    /// `InvalidArgument` (`what = "tls"`) naming the file that is missing or not PEM.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self> {
        Ok(Self {
            ca_pem: read_pem("CA certificate", ca)?,
            identity: match identity {
                Some((cert, key)) => Some((
                    read_pem("certificate", cert)?,
                    read_pem("private key", key)?,
                )),
                None => None,
            },
        })
    }
}

/// Reads one PEM file; `what` names it in the error.
///
/// # Errors
/// `InvalidArgument` (`what = "tls"`) when the file cannot be read or holds no PEM block.
pub fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::InvalidArgument {
        what: "tls",
        reason,
    };
    let bytes = std::fs::read(path)
        .map_err(|e| bad(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(bad(format!("the {what} {} is not PEM", path.display())));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_non_pem_file_is_named() {
        let dir = std::env::temp_dir().join(format!("ha-core-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let junk = dir.join("junk.pem");
        let _ = std::fs::write(&junk, b"not a certificate");
        for (path, says) in [
            (dir.join("missing.pem"), "cannot read the CA certificate"),
            (junk, "is not PEM"),
        ] {
            match ClientTls::from_files(&path, None) {
                Err(Error::InvalidArgument {
                    what: "tls",
                    reason,
                }) => {
                    assert!(
                        reason.contains(says) && reason.contains(&path.display().to_string()),
                        "{reason}"
                    );
                }
                other => panic!("{} gave {other:?}", path.display()),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
