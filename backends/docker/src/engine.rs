//! The engine calls the backend makes, and how their errors read.

use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{RemoveContainerOptions, WaitContainerOptions};
use flame::{Error, ErrorKind, LastWords, RunnerOutput};
use futures::StreamExt;

/// The parent's own container, as the engine sees it.
pub(crate) struct Own {
    pub(crate) id: String,
    /// The image id, not its tag: runners boot exactly what the parent runs.
    pub(crate) image: String,
    pub(crate) entrypoint: Option<Vec<String>>,
    pub(crate) cmd: Option<Vec<String>>,
    pub(crate) networks: Vec<(String, Option<IpAddr>)>,
}

/// Whether `id` is a full container id (64 hex digits), not a name or a prefix.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn is_status(error: &EngineError, status: u16) -> bool {
    matches!(error, EngineError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

/// The engine's message, without bollard's wrapping when it is the engine speaking.
fn message(error: &EngineError) -> String {
    match error {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (HTTP {status_code})"),
        other => other.to_string(),
    }
}

/// Whether the error is the engine not answering at all (rather than answering, or answering
/// something unexpected).
fn is_unreachable(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::SocketNotFoundError(_)
            | EngineError::IOError { .. }
            | EngineError::HyperLegacyError { .. }
            | EngineError::HyperResponseError { .. }
            | EngineError::HttpClientError { .. }
    )
}

pub(crate) fn unreachable(error: &EngineError) -> Error {
    Error::new(
        ErrorKind::BootFailed,
        format!(
            "the Docker engine cannot be reached: {error} (is the daemon running? in a \
             container, mount its socket: -v /var/run/docker.sock:/var/run/docker.sock)"
        ),
    )
}

/// An engine refusal while booting a runner: what was being done, the engine's words, a hint.
pub(crate) fn boot_failed(doing: String, error: &EngineError, hint: &str) -> Error {
    if is_unreachable(error) {
        return unreachable(error);
    }
    Error::new(
        ErrorKind::BootFailed,
        format!("{doing}: the Docker engine said: {}{hint}", message(error)),
    )
}

pub(crate) fn error(doing: &str, error: &EngineError) -> Error {
    boot_failed(doing.to_string(), error, "")
}

/// Finds the container this process runs in, if it runs in one of this engine's.
pub(crate) async fn own_container(docker: &Docker) -> Result<Option<Own>, Error> {
    let (from_mounts, hostname) = own_id_candidates();
    let candidates = from_mounts.iter().map(|id| (id, false));
    for (candidate, is_hostname) in candidates.chain(hostname.iter().map(|h| (h, true))) {
        let inspected = match docker
            .inspect_container(
                candidate,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(inspected) => inspected,
            // Another engine's container, or a hostname that is not a container's.
            Err(e) if is_status(&e, 404) => continue,
            Err(e) => return Err(error("inspecting the parent's own container", &e)),
        };
        let (Some(id), Some(image)) = (inspected.id, inspected.image) else {
            continue;
        };
        let config = inspected.config.unwrap_or_default();
        // The engine also matches names and id prefixes: a hostname names this container only
        // if it is the short id the engine gave it.
        if is_hostname
            && !(id.starts_with(candidate.as_str())
                && config.hostname.as_deref() == Some(candidate.as_str()))
        {
            continue;
        }
        let mut networks: Vec<(String, Option<IpAddr>)> = inspected
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, endpoint)| {
                let ip = endpoint.ip_address.and_then(|ip| ip.parse().ok());
                (name, ip)
            })
            .collect();
        networks.sort();
        return Ok(Some(Own {
            id,
            image,
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            networks,
        }));
    }
    Ok(None)
}

/// Docker bind-mounts `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` from
/// `.../containers/<id>/`, which names the container on cgroup v1 and v2 alike. Only those
/// mounts count: on a Docker host, a process outside any container sees other containers' mounts
/// too. The hostname is the container's short id unless set otherwise.
fn own_id_candidates() -> (Vec<String>, Option<String>) {
    let mut ids = Vec::new();
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines() {
            // Fields: id, parent, dev, root, mount point, ...
            let mut fields = line.split(' ');
            let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
                continue;
            };
            if !matches!(
                mount_point,
                "/etc/hostname" | "/etc/hosts" | "/etc/resolv.conf"
            ) {
                continue;
            }
            let id = root
                .split("/containers/")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .filter(|id| is_container_id(id));
            if let Some(id) = id
                && !ids.iter().any(|known| known == id)
            {
                ids.push(id.to_string());
            }
        }
    }
    let hostname = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    (ids, hostname)
}

/// The gateway of `network`: the host's address on it, where runners reach a parent that is not
/// in a container.
pub(crate) async fn gateway(docker: &Docker, network: &str) -> Result<IpAddr, Error> {
    let inspected = docker
        .inspect_network(
            network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .map_err(|e| error(&format!("inspecting network {network}"), &e))?;
    // Older engines leave the default bridge's gateway out; Docker gives a network's gateway the
    // first address of its subnet.
    let first_host = |subnet: &str| {
        let (base, bits) = subnet.split_once('/')?;
        let base: std::net::Ipv4Addr = base.parse().ok()?;
        let bits: u32 = bits.parse().ok().filter(|b| *b < 31)?;
        let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        Some(IpAddr::from(std::net::Ipv4Addr::from(
            (u32::from(base) & mask) + 1,
        )))
    };
    inspected
        .ipam
        .and_then(|ipam| ipam.config)
        .unwrap_or_default()
        .into_iter()
        .filter_map(
            |config| match config.gateway.and_then(|g| g.parse::<IpAddr>().ok()) {
                Some(gateway) => Some(gateway),
                None => first_host(config.subnet.as_deref()?),
            },
        )
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "network {network} has no IPv4 gateway for runners to reach this host by \
                     (call DockerBackendBuilder::listen)"
                ),
            )
        })
}

/// Whether the container a runner names as its parent has stopped or is gone. A parent id that
/// is not a container id (a parent outside a container) is not judged.
pub(crate) async fn parent_gone(docker: &Docker, parent: &str) -> Result<bool, Error> {
    if !is_container_id(parent) {
        return Ok(false);
    }
    match docker
        .inspect_container(
            parent,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(inspected) => Ok(inspected.state.and_then(|s| s.running) != Some(true)),
        Err(e) if is_status(&e, 404) => Ok(true),
        Err(e) => Err(error("inspecting a runner's parent container", &e)),
    }
}

/// Removes a container, running or not; one that is already gone is fine.
pub(crate) async fn force_remove(docker: &Docker, id: &str) -> Result<(), Error> {
    let removed = docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    match removed {
        Ok(()) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        // AutoRemove got there first.
        Err(e) if is_status(&e, 409) => {
            if removed_within(docker, id, Duration::from_secs(10)).await {
                Ok(())
            } else {
                Err(error(&format!("removing container {id}"), &e))
            }
        }
        Err(e) => Err(error(&format!("removing container {id}"), &e)),
    }
}

/// Waits until the container is removed (AutoRemove after it exits); false if it still exists
/// after `limit`.
pub(crate) async fn removed_within(docker: &Docker, id: &str, limit: Duration) -> bool {
    let wait = docker.wait_container(
        id,
        Some(WaitContainerOptions {
            condition: "removed".into(),
        }),
    );
    let outcome = tokio::time::timeout(limit, Box::pin(wait).next()).await;
    match outcome {
        // Out of time, or the answer never came (a dropped connection): not known to be gone.
        Err(_) | Ok(None) => false,
        // A non-zero exit is reported as an error by bollard; the container is gone all the same.
        Ok(Some(Ok(_))) => true,
        Ok(Some(Err(e))) => {
            matches!(e, EngineError::DockerContainerWaitError { .. }) || is_status(&e, 404)
        }
    }
}

/// Resolves with how the container ended, once it has; never, if the engine cannot tell.
pub(crate) async fn exited(docker: &Docker, id: &str) -> String {
    let wait = docker.wait_container(
        id,
        Some(WaitContainerOptions {
            condition: "not-running".into(),
        }),
    );
    match Box::pin(wait).next().await {
        Some(Ok(response)) => format!("container exited with code {}", response.status_code),
        Some(Err(EngineError::DockerContainerWaitError { code, .. })) => {
            format!("container exited with code {code}")
        }
        Some(Err(e)) if is_status(&e, 404) => "container is gone".to_string(),
        _ => futures::future::pending().await,
    }
}

/// Copies a runner container's output into ours, as a Process runner's is, and keeps its last
/// words: when a container dies before its runner dials back, they usually say why, and
/// `AutoRemove` deletes its logs with it. Attached before the container starts, so nothing it
/// prints is missed. The returned receiver resolves when its output has ended.
pub(crate) async fn follow_output(
    docker: &Docker,
    id: &str,
    runner_id: &str,
) -> Result<(LastWords, tokio::sync::oneshot::Receiver<()>), EngineError> {
    use bollard::container::LogOutput;
    use bollard::query_parameters::AttachContainerOptions;
    let attached = docker
        .attach_container(
            id,
            Some(AttachContainerOptions {
                stdout: true,
                stderr: true,
                stream: true,
                logs: true,
                ..Default::default()
            }),
        )
        .await?;
    let mut output = RunnerOutput::new(runner_id);
    let last_words = output.last_words();
    let (ended, ended_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut stream = attached.output;
        while let Some(Ok(chunk)) = stream.next().await {
            match chunk {
                LogOutput::StdErr { message } => output.stderr(&message),
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    output.stdout(&message)
                }
                LogOutput::StdIn { .. } => {}
            }
        }
        output.finish();
        let _ = ended.send(());
    });
    Ok((last_words, ended_rx))
}
