//! An emulator of the Fly Machines API, for tests: the real API can't be reached from here.
//!
//! It speaks the subset the backend uses, with Fly's paths, JSON shapes, status codes and bearer
//! auth (`POST /v1/apps/{app}/machines`, `GET` of one or all, `DELETE ...?force=true`), and it
//! **really boots the image**: an image name maps to a command line on this machine (the test's
//! own executable), started with the Machine's env plus the `FLY_*` variables Fly sets. It tracks
//! each Machine's state (created → started → stopped → destroyed), destroys an `auto_destroy`
//! Machine when its process exits, and can be told to answer creates with errors (429, 412,
//! 422), to boot slowly, or to boot a Machine whose process never dials back. Its answers are
//! checked against Fly's documented examples in `fixtures/` (see `api_fixtures.rs`).

#![allow(dead_code)] // each test file uses its part

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

/// What the next create request gets instead of a Machine that boots at once.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// An error answer: status and Fly's message.
    Status(u16, &'static str),
    /// The Machine starts after this long.
    SlowBoot(Duration),
    /// The Machine "starts" but runs nothing: it never dials back.
    NeverDialsBack,
}

#[derive(Default)]
struct Emulated {
    machines: BTreeMap<String, Value>,
    processes: HashMap<String, Process>,
    faults: VecDeque<Fault>,
    creates: u32,
    deletes: Vec<String>,
}

/// A running emulator.
#[derive(Clone)]
pub(crate) struct Emulator {
    pub(crate) url: String,
    pub(crate) token: String,
    app: String,
    images: Arc<HashMap<String, Vec<String>>>,
    state: Arc<Mutex<Emulated>>,
}

impl Emulator {
    /// Starts an emulator for `app`, accepting `token`, booting each image in `images` as its
    /// command line.
    pub(crate) async fn start(
        app: &str,
        token: &str,
        images: HashMap<String, Vec<String>>,
    ) -> Emulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emulator = Emulator {
            url: format!("http://{}", listener.local_addr().unwrap()),
            token: token.to_string(),
            app: app.to_string(),
            images: Arc::new(images),
            state: Arc::default(),
        };
        let router = Router::new()
            .route("/v1/apps/{app}/machines", get(list).post(create))
            .route("/v1/apps/{app}/machines/{id}", get(one).delete(destroy))
            .with_state(emulator.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        emulator
    }

    /// Queues faults for the next creates, in order.
    pub(crate) fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Machines not destroyed, by id, with their state.
    pub(crate) fn live(&self) -> BTreeMap<String, String> {
        self.lock()
            .machines
            .iter()
            .filter(|(_, m)| m["state"] != "destroyed")
            .map(|(id, m)| (id.clone(), m["state"].as_str().unwrap_or("").to_string()))
            .collect()
    }

    /// The `config` a Machine was created with, as the backend sent it.
    pub(crate) fn config_of(&self, id: &str) -> Value {
        self.lock().machines[id]["config"].clone()
    }

    /// Create requests seen, including refused ones.
    pub(crate) fn creates(&self) -> u32 {
        self.lock().creates
    }

    /// Machines deleted through the API, in order.
    pub(crate) fn deletes(&self) -> Vec<String> {
        self.lock().deletes.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Emulated> {
        self.state.lock().unwrap()
    }

    /// The answer to a request without the right token or for another app, if it is one.
    fn denied(&self, headers: &HeaderMap, app: &str) -> Option<Response> {
        let expected = format!("Bearer {}", self.token);
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "You must be authenticated to view this.",
            ));
        }
        (app != self.app).then(|| error(StatusCode::NOT_FOUND, "app not found"))
    }
}

/// An error as the OpenAPI spec's `ErrorResponse` has it: `error`, and `status`
/// (`insufficient_capacity` for capacity refusals, else `unknown`).
fn error(status: StatusCode, message: &str) -> Response {
    let kind = match status.as_u16() {
        412 | 422 if message.contains("insufficient") => "insufficient_capacity",
        _ => "unknown",
    };
    (status, Json(json!({ "error": message, "status": kind }))).into_response()
}

fn machine_id() -> String {
    flame::__private::random_hex::<7>()
}

async fn create(
    State(emu): State<Emulator>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(denied) = emu.denied(&headers, &app) {
        return denied;
    }
    let fault = {
        let mut state = emu.lock();
        state.creates += 1;
        state.faults.pop_front()
    };
    if let Some(Fault::Status(status, message)) = fault {
        return error(StatusCode::from_u16(status).unwrap(), message);
    }
    let config = body["config"].clone();
    let Some(image) = config["image"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "config.image is required");
    };
    let Some(argv) = emu.images.get(image).cloned() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("image {image:?} not found"),
        );
    };
    let id = machine_id();
    let region = body["region"].as_str().unwrap_or("ord").to_string();
    let private_ip = format!("fdaa:0:1:a7b:1::{}", &id[..4]);
    let now = "2026-11-27T12:00:00Z";
    let machine = json!({
        "id": id,
        "name": body["name"].as_str().map_or_else(|| format!("machine-{id}"), str::to_string),
        "state": "created",
        "region": region,
        "instance_id": format!("01H{}", id.to_uppercase()),
        "private_ip": private_ip,
        "config": config,
        "image_ref": { "registry": "registry.fly.io", "repository": image, "tag": "latest" },
        "created_at": now,
        "updated_at": now,
        "events": [],
    });
    emu.lock().machines.insert(id.clone(), machine.clone());

    let mut env: HashMap<String, String> = config["env"]
        .as_object()
        .map(|vars| {
            vars.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    env.insert("FLY_APP_NAME".into(), app);
    env.insert("FLY_MACHINE_ID".into(), id.clone());
    env.insert("FLY_REGION".into(), region);
    env.insert("FLY_PRIVATE_IP".into(), private_ip);
    env.insert("FLY_IMAGE_REF".into(), image.to_string());
    let auto_destroy = config["auto_destroy"].as_bool().unwrap_or(false);
    let boot = emu.clone();
    let started_id = id.clone();
    tokio::spawn(async move {
        match fault {
            Some(Fault::SlowBoot(delay)) => tokio::time::sleep(delay).await,
            Some(Fault::NeverDialsBack) => {
                boot.set_state(&started_id, "started");
                return;
            }
            _ => {}
        }
        boot.run(&started_id, &argv, env, auto_destroy).await;
    });
    (StatusCode::OK, Json(machine)).into_response()
}

impl Emulator {
    /// Registers (or updates) a parent Machine: the app's web Machines are parents, which the
    /// sweep looks up by id. Only its record: nothing runs for it.
    pub(crate) fn put_parent(&self, id: &str, instance_id: &str, state: &str) {
        let machine = json!({
            "id": id,
            "name": format!("web-{id}"),
            "state": state,
            "region": "ord",
            "instance_id": instance_id,
            "private_ip": "fdaa:0:1:a7b:1::1",
            "config": { "image": "registry.fly.io/thumbs-app:web", "metadata": {} },
        });
        self.lock().machines.insert(id.to_string(), machine);
    }

    /// Forgets a parent Machine, as Fly does once it is destroyed and gone from the API.
    pub(crate) fn remove_parent(&self, id: &str) {
        self.lock().machines.remove(id);
    }

    fn set_state(&self, id: &str, state: &str) {
        if let Some(machine) = self.lock().machines.get_mut(id)
            && machine["state"] != "destroyed"
        {
            machine["state"] = json!(state);
        }
    }

    /// Runs a Machine's process; on exit, stops (and with `auto_destroy`, destroys) it.
    async fn run(
        &self,
        id: &str,
        argv: &[String],
        env: HashMap<String, String>,
        auto_destroy: bool,
    ) {
        let mut state = self.lock();
        if state
            .machines
            .get(id)
            .is_some_and(|m| m["state"] == "destroyed")
        {
            return; // deleted while it booted
        }
        // A Machine's process sees the env Fly gives it, not this host's (but for PATH).
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| k == "PATH"))
            .envs(env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let Ok(mut child) = child else {
            drop(state);
            return self.set_state(id, "stopped");
        };
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        state
            .processes
            .insert(id.to_string(), Process { _kill: kill });
        drop(state);
        self.set_state(id, "started");
        let emu = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::select! {
                _ = child.wait() => {}
                // Deleted: the VM stops.
                _ = killed => {
                    let _ = child.kill().await;
                }
            }
            let mut state = emu.lock();
            state.processes.remove(&id);
            if let Some(machine) = state.machines.get_mut(&id)
                && machine["state"] != "destroyed"
            {
                machine["state"] = json!(if auto_destroy { "destroyed" } else { "stopped" });
            }
        });
    }
}

/// A Machine's running process: dropping `_kill` stops it.
struct Process {
    _kill: tokio::sync::oneshot::Sender<()>,
}

async fn list(
    State(emu): State<Emulator>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(denied) = emu.denied(&headers, &app) {
        return denied;
    }
    let include_deleted = query.get("include_deleted").is_some_and(|v| v == "true");
    let machines: Vec<Value> = emu
        .lock()
        .machines
        .values()
        .filter(|m| include_deleted || m["state"] != "destroyed")
        .filter(|m| {
            // `metadata.{key}={value}` filters, as Fly documents them.
            query
                .iter()
                .all(|(k, v)| match k.strip_prefix("metadata.") {
                    Some(key) => m["config"]["metadata"][key] == json!(v),
                    None => true,
                })
        })
        .cloned()
        .collect();
    Json(machines).into_response()
}

async fn one(
    State(emu): State<Emulator>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = emu.denied(&headers, &app) {
        return denied;
    }
    match emu.lock().machines.get(&id) {
        Some(machine) => Json(machine.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "machine not found"),
    }
}

async fn destroy(
    State(emu): State<Emulator>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(denied) = emu.denied(&headers, &app) {
        return denied;
    }
    let force = query.get("force").is_some_and(|v| v == "true");
    let mut state = emu.lock();
    let Some(machine) = state.machines.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "machine not found");
    };
    if machine["state"] == "destroyed" {
        return error(StatusCode::NOT_FOUND, "machine not found");
    }
    if machine["state"] == "started" && !force {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "failed to destroy machine: machine still active, refusing to destroy",
        );
    }
    machine["state"] = json!("destroyed");
    state.deletes.push(id.clone());
    // Its process is stopped, as Fly stops the VM.
    state.processes.remove(&id);
    Json(json!({ "ok": true })).into_response()
}
