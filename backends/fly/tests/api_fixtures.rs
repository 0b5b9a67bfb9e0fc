//! Fly's documented request and response examples (`fixtures/`, sources in
//! `fixtures/SOURCES.md`) against the backend's types and the emulator's answers.

use std::collections::{BTreeSet, HashMap};

use flame_backend_fly::{CreateMachine, Machine};
use serde_json::Value;
use support::Emulator;

mod support;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn documented_create_requests_read_as_the_backends_type() {
    let plain: CreateMachine = serde_json::from_value(fixture("create_request.json")).unwrap();
    assert_eq!(
        plain.config.image,
        "registry-1.docker.io/library/ubuntu:latest"
    );
    assert_eq!(plain.config.auto_destroy, Some(true));
    // The documented `init` reads as the backend's: `exec` is Fly's own example.
    assert_eq!(
        plain.config.init.as_ref().map(|i| i.exec.clone()),
        Some(vec!["/bin/sleep".to_string(), "inf".to_string()])
    );
    let guest = plain.config.guest.unwrap();
    assert_eq!(
        (guest.cpu_kind.as_str(), guest.cpus, guest.memory_mb),
        ("shared", 1, 256)
    );
    let with_env: CreateMachine =
        serde_json::from_value(fixture("create_request_with_env_services.json")).unwrap();
    assert_eq!(
        with_env.config.env.get("APP_ENV").map(String::as_str),
        Some("production")
    );
    // What the backend writes reads back the same.
    let written = serde_json::to_value(&with_env).unwrap();
    assert_eq!(
        serde_json::from_value::<CreateMachine>(written).unwrap(),
        with_env
    );
}

#[test]
fn documented_responses_read_as_the_backends_type() {
    let created: Machine = serde_json::from_value(fixture("create_response.json")).unwrap();
    assert_eq!(created.id, "1857156b526dd8");
    assert_eq!(created.state, "created");
    assert_eq!(created.private_ip, "fdaa:ff:ff:a7b:195:e229:8038:2");
    let listed: Vec<Machine> =
        serde_json::from_value(fixture("list_response.strict.json")).unwrap();
    assert!(!listed.is_empty());
}

#[tokio::test]
async fn the_emulator_answers_as_fly_documents() {
    let documented_request = fixture("create_request.json");
    let image = documented_request["config"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let images = HashMap::from([(image, vec!["sleep".to_string(), "1000".to_string()])]);
    let emu = Emulator::start("my-app-name", "t0k3n", images).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/apps/my-app-name/machines", emu.url);

    let denied = http
        .post(&url)
        .json(&documented_request)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401, "no token, no machine");

    let created = http
        .post(&url)
        .bearer_auth("t0k3n")
        .json(&documented_request)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200, "Fly documents 200 for a create");
    let created: Value = created.json().await.unwrap();
    let documented = fixture("create_response.json");
    let missing: Vec<_> = keys(&documented)
        .difference(&keys(&created))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "the emulator's machine lacks {missing:?}"
    );
    assert_eq!(created["state"], "created");
    assert_eq!(created["config"]["image"], documented["config"]["image"]);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 14);

    let listed: Value = http
        .get(format!("{url}?metadata.flame_parent=nobody"))
        .bearer_auth("t0k3n")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, Value::Array(vec![]), "the metadata filter applies");

    let deleted = http
        .delete(format!("{url}/{id}?force=true"))
        .bearer_auth("t0k3n")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        deleted.json::<Value>().await.unwrap(),
        fixture("delete_response.json")
    );
    assert!(emu.live().is_empty());
}
