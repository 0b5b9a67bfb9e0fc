//! Optional TLS between parent and runners (feature `tls`), for runners on networks that are
//! not private. Zero configuration: the parent makes a self-signed certificate when it first
//! needs one, and hands its SHA-256 fingerprint to each runner in the hand-off, so a runner
//! trusts exactly that certificate and no certificate authority is involved.
//!
//! The runner sends one plaintext frame naming itself (so the listener knows which pool to route
//! it to), then everything, the handshake's token included, travels inside TLS.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, ErrorKind};
use crate::parent::{hex, unhex};

/// The name in the parent's certificate and the one runners ask for. Only the fingerprint is
/// checked; the name just has to match itself.
const SERVER_NAME: &str = "flame-parent";

/// The parent's side: its certificate's acceptor and fingerprint.
pub(crate) struct ParentTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// Lower-case hex SHA-256 of the certificate, as put in the hand-off.
    pub(crate) fingerprint: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("TLS: {what}: {e}"))
}

/// This process's TLS identity as a parent, made on first use.
pub(crate) fn parent_tls() -> Result<&'static ParentTls, Error> {
    static PARENT: OnceLock<Result<ParentTls, Error>> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
                .map_err(|e| tls_error("making the parent's certificate", e))?;
            let cert: CertificateDer<'static> = certified.cert.der().clone();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            ));
            let fingerprint = hex(&sha256(&cert));
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| tls_error("configuring the parent", e))?
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .map_err(|e| tls_error("configuring the parent's certificate", e))?;
            Ok(ParentTls {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                fingerprint,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A connector that trusts only the certificate with this fingerprint (hex SHA-256).
pub(crate) fn connector(
    fingerprint: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), Error> {
    let pinned = unhex(fingerprint).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "the hand-off's TLS fingerprint is not 64 hex digits",
        )
    })?;
    let provider = provider();
    let verifier = Arc::new(Pinned {
        fingerprint: pinned,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("configuring the runner", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| tls_error("the server name", e))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// Trusts one certificate, named by its fingerprint; signatures are still verified, so only
/// the holder of that certificate's key can complete the handshake.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the parent's certificate does not match the fingerprint in the hand-off".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
