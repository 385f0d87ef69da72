//! fedpeft-tls: TLS to the MQTT broker (`mqtts://`) for the aggregator and the edge client, a
//! rustls client configuration on the `ring` provider from PEM files — the CA that signed the broker's certificate and, optionally, a
//! client certificate and key for brokers that authenticate clients by certificate. [`broker`]
//! reads and checks the settings both programs take to reach a broker (one URL, or the nodes of
//! a cluster), and [`failover`] moves rumqttc's event loop on to the next node of the list when
//! a connection fails.

pub mod broker;
pub mod failover;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS files of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the certificate authority (or authorities) the broker's certificate must
    /// chain to.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) and its private key, if the broker asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A TLS file that cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS file {path}: {reason}")]
    Content { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, TlsError> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Content {
            path: path.to_path_buf(),
            reason: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.to_path_buf(),
            reason: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|e| TlsError::Content {
            path: path.to_path_buf(),
            reason: format!("not PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Content {
            path: path.to_path_buf(),
            reason: "holds no private key (PKCS#8, PKCS#1 or SEC1 PEM block)".into(),
        })
}

/// The rustls client configuration for `files`: server certificates are verified against the
/// CA file only (not the system's roots), TLS 1.2 and 1.3, `ring` crypto.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&files.ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Content {
            path: files.ca_file.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match &files.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| TlsError::Content {
                path: key.clone(),
                reason: format!("does not match client certificate {}: {e}", cert.display()),
            })?,
    };
    Ok(Arc::new(config))
}

/// The rumqttc transport for `files`.
pub fn transport(files: &TlsFiles) -> Result<rumqttc::Transport, TlsError> {
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_config(files)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = client_config(&TlsFiles {
            ca_file: missing.clone(),
            client_cert: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_config(&TlsFiles {
            ca_file: empty,
            client_cert: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("empty.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
    }
}
