//! The part of the Fly Machines API this backend speaks: request and response bodies, as Fly
//! documents them (the tests check them against Fly's documented examples).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The body of `POST /v1/apps/{app}/machines`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateMachine {
    /// The Machine's name (the runner id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// What it runs.
    pub config: MachineConfig,
}

/// A Machine's configuration: the fields this backend sets or reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The image to boot.
    #[serde(default)]
    pub image: String,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// CPU, memory, GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    /// Destroy the Machine when its process exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    /// Whether Fly restarts its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Volumes to mount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// What the Machine's init runs instead of the image's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<MachineInit>,
}

/// `mounts[]`: a Fly Volume and where it appears in the Machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    /// The Volume's id (`vol_...`).
    pub volume: String,
    /// Where it is mounted.
    pub path: String,
}

/// `init`: overrides of the image's entrypoint and command, or an `exec` that replaces both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInit {
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// Replaces the image's command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Runs this instead of entrypoint and command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
}

/// A Machine's size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    /// `shared` or `performance`.
    pub cpu_kind: String,
    /// How many CPUs.
    pub cpus: u32,
    /// Memory, a multiple of 256.
    pub memory_mb: u32,
    /// A GPU kind, if any (`a10`, `l40s`, `a100-pcie-40gb`, `a100-sxm4-80gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_kind: Option<String>,
    /// How many GPUs of that kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

impl Default for Guest {
    fn default() -> Guest {
        Guest {
            cpu_kind: "shared".into(),
            cpus: 1,
            memory_mb: 256,
            gpu_kind: None,
            gpus: None,
        }
    }
}

/// `restart: {policy}`: `no`, `on-failure` or `always`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// The policy.
    pub policy: String,
}

/// A Machine as the API returns it: the fields this backend reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Its id.
    pub id: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// `created`, `starting`, `started`, `stopping`, `stopped`, `destroying`, `destroyed`...
    #[serde(default)]
    pub state: String,
    /// Its region.
    #[serde(default)]
    pub region: String,
    /// Its version: Fly gives a Machine a new one whenever its config changes (a deploy), and
    /// sets it in the Machine's environment as `FLY_MACHINE_VERSION`.
    #[serde(default)]
    pub instance_id: String,
    /// Its 6PN address.
    #[serde(default)]
    pub private_ip: String,
    /// Its configuration.
    #[serde(default)]
    pub config: MachineConfig,
}

/// The message of an API error response: its `error` field, or the body as it is.
pub(crate) async fn error_message(response: reqwest::Response) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let body = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&body) {
        Ok(e) => e.error,
        Err(_) => body.trim().to_string(),
    }
}
