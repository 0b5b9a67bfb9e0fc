//! The emulator's CA and serving certificate, and the TLS accept loop that serves the same router
//! as the plain port: a program in a pod only speaks HTTPS (`Config::incluster()`).

use std::net::IpAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// A fresh CA, and a server certificate it signed.
pub(crate) struct Certificates {
    pub(crate) ca_pem: String,
    pub(crate) ca_der: Vec<u8>,
    server: rustls::ServerConfig,
}

pub(crate) fn certificates(gateway: IpAddr) -> Certificates {
    let ca_key = KeyPair::generate().expect("generating the CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flame-k8s-emulator-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("self-signing the CA");
    let server_key = KeyPair::generate().expect("generating the server key");
    let mut server_params = CertificateParams::new(vec![
        gateway.to_string(),
        "127.0.0.1".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes".to_string(),
    ])
    .expect("server certificate parameters");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .expect("signing the server certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![
                CertificateDer::from(server_cert.der().to_vec()),
                CertificateDer::from(ca.der().to_vec()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("the server certificate");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Certificates {
        ca_pem: pem(ca.der()),
        ca_der: ca.der().to_vec(),
        server,
    }
}

/// PEM armour for a certificate (rcgen's `pem` feature is not in the lock file).
fn pem(der: &[u8]) -> String {
    let encoded = serde_json::to_value(k8s_openapi::ByteString(der.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("base64");
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Serves `router` over TLS on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    certificates: &Certificates,
    router: axum::Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(certificates.server.clone()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            // A client that gives up mid-handshake is not the emulator's problem.
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(router))
                .await;
        });
    }
}
