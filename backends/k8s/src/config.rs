//! Where the parent finds its cluster, its namespace and its own pod.

use flame::{Error, ErrorKind};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::status::{api_error, is_code};

/// The cluster's client: in-cluster (the pod's service account) when in a pod, else the
/// kubeconfig, as `kubectl` finds it.
pub(crate) async fn client() -> Result<kube::Client, Error> {
    let mut config = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "reading the pod's in-cluster config (its service account token and CA in \
                     /var/run/secrets/kubernetes.io/serviceaccount): {e}; is \
                     automountServiceAccountToken off for the parent?"
                ),
            )
        })?
    } else {
        kube::Config::infer().await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "no Kubernetes cluster to use: not in a pod (KUBERNETES_SERVICE_HOST is \
                     unset) and no usable kubeconfig ($KUBECONFIG or ~/.kube/config): {e}"
                ),
            )
        })?
    };
    // A refused create fails the boot at once; the pool's own boot retries (with backoff)
    // decide what happens next, rather than a client retrying for minutes underneath.
    config.default_retry = false;
    // No request may hang a boot, a destroy or the watch for ever on a server gone silent. The
    // watches end on the server's side well within this (watch.rs, WATCH_SECONDS).
    config.read_timeout = Some(READ_TIMEOUT);
    config.reset_reader_on_write = true;
    use_ring_unless_chosen();
    kube::Client::try_from(config).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("making the Kubernetes client: {e}"),
        )
    })
}

/// The longest the client waits for a byte of a response.
const READ_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(crate::watch::WATCH_SECONDS as u64 + 15);

/// Makes `ring` rustls's process-wide provider unless the app chose one. kube does this itself
/// for `aws-lc-rs` but not for `ring` (the provider flame-rt uses everywhere): without it, an app
/// whose dependencies enable both providers panics the first time kube opens a TLS connection.
pub(crate) fn use_ring_unless_chosen() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is chosen either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The parent's own pod name: `POD_NAME` (the downward API), else the hostname, which is the
/// pod's name unless the spec sets another.
pub(crate) fn own_pod_name() -> Option<String> {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
}

/// Reads the parent's own pod, saying what to fix when it cannot.
pub(crate) async fn own_pod(pods: &Api<Pod>, name: &str, namespace: &str) -> Result<Pod, Error> {
    pods.get(name).await.map_err(|e| {
        if is_code(&e, 404) {
            Error::new(
                ErrorKind::Config,
                format!(
                    "the parent's pod {name:?} is not in namespace {namespace:?}: set POD_NAME and \
                     POD_NAMESPACE from the downward API (docs/deploy-kubernetes.md), or call \
                     K8sBackendBuilder::pod"
                ),
            )
        } else {
            api_error(
                ErrorKind::Config,
                &format!("reading the parent's own pod {namespace}/{name}"),
                &e,
            )
        }
    })
}
