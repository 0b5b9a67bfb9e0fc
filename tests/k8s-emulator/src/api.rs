//! The HTTP API: discovery and OpenAPI documents, then one handler that parses resource paths
//! itself (the apiserver's path grammar is simpler to match by hand than with routes).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::auth::{self, Attributes};
use crate::store::{self, FieldSelector, KINDS, Kind, LabelSelector, meta};
use crate::{Shared, kubelet, lock};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut response = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A Status body as the response, with its own code.
fn error_response(status: &Value) -> Response {
    let code = status["code"].as_u64().unwrap_or(500) as u16;
    json_response(code, status)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// A resource path, parsed.
struct Route {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, resource, name, sub) = match rest {
        ["namespaces", ns, resource, more @ ..] if more.len() <= 2 => {
            (Some(*ns), *resource, more.first(), more.get(1))
        }
        [resource, more @ ..] if more.len() <= 2 => (None, *resource, more.first(), more.get(1)),
        _ => return None,
    };
    let kind = store::kind_of(group, version, resource)?;
    if namespace.is_some() && !kind.namespaced {
        return None;
    }
    if namespace.is_none() && kind.namespaced && name.is_some() {
        return None;
    }
    Some(Route {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(|n| n.to_string()),
        sub: sub.map(|s| s.to_string()),
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let who = token.and_then(|t| lock(&shared.tokens).identify(t));
    let query = parse_query(uri.query());
    let path = uri.path().trim_end_matches('/');
    // As in a real cluster (the system:public-info-viewer role), /version is open to anyone:
    // gcloud's kubectl dispatcher asks it without credentials to pick a kubectl.
    let public = method == Method::GET && path == "/version";
    let Some(who) = who.or(public.then_some(auth::Identity::Admin)) else {
        return error_response(&auth::unauthorized());
    };
    if method == Method::GET
        && let Some(document) = discovery(path, &headers)
    {
        return json_response(200, &document);
    }
    let Some(route) = parse_route(path) else {
        return error_response(&auth::no_route());
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &route.name, route.sub.as_deref()) {
        (&Method::GET, None, None) if watching => "watch",
        (&Method::GET, None, None) => "list",
        (&Method::GET, Some(_), None) => "get",
        (&Method::GET, Some(_), Some("log")) if route.kind.resource == "pods" => "get",
        (&Method::POST, None, None) => "create",
        (&Method::PUT, Some(_), None) => "update",
        (&Method::PATCH, Some(_), None) => "patch",
        (&Method::DELETE, Some(_), None) => "delete",
        (_, _, Some(_)) => return error_response(&auth::no_route()),
        _ => {
            return error_response(&auth::status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ));
        }
    };
    let kind = route.kind;
    let rbac_resource = match &route.sub {
        Some(sub) => format!("{}/{sub}", kind.resource),
        None => kind.resource.to_string(),
    };
    let denied = auth::authorize(
        &lock(&shared.store),
        &who,
        &Attributes {
            verb,
            group: kind.group,
            resource: &rbac_resource,
            namespace: route.namespace.as_deref(),
            name: route.name.as_deref(),
        },
    );
    if let Err(status) = denied {
        return error_response(&status);
    }
    *lock(&shared.requests)
        .entry((verb.to_string(), kind.resource.to_string()))
        .or_default() += 1;
    if let Some((status, retry_after)) = shared.take_fault(verb, kind.resource) {
        let mut response = error_response(&status);
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        return response;
    }
    let ns = route.namespace.clone().unwrap_or_default();
    let name = route.name.clone().unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let result = match verb {
        "watch" => return watch(&shared, kind, route.namespace.as_deref(), &query),
        "list" => list(&shared, kind, route.namespace.as_deref(), &query),
        "get" if route.sub.is_some() => return logs(&shared, &ns, &name, &query).await,
        "get" => lock(&shared.store)
            .get(kind.resource, &ns, &name)
            .cloned()
            .map(|o| (200, o))
            .ok_or_else(|| auth::not_found(kind.group, kind.resource, &name)),
        "create" => create(&shared, kind, &ns, &query, &body),
        "update" => update(&shared, kind, &ns, &name, &query, &body),
        "patch" => patch(&shared, kind, &ns, &name, &query, &content_type, &body),
        "delete" => delete(&shared, kind, &ns, &name, &query, &body),
        _ => unreachable!("every verb is handled"),
    };
    match result {
        Ok((code, object)) => json_response(code, &object),
        Err(status) => error_response(&status),
    }
}

type Answer = Result<(u16, Value), Value>;

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), Value> {
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| auth::bad_request(&format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| auth::bad_request(&e))?;
    Ok((labels, fields))
}

fn list(shared: &Shared, kind: &Kind, ns: Option<&str>, query: &HashMap<String, String>) -> Answer {
    let (labels, fields) = selectors(query)?;
    let store = lock(&shared.store);
    let items = store.list(kind.resource, ns, &labels, &fields);
    Ok((
        200,
        json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": store.resource_version().to_string()},
            "items": items,
        }),
    ))
}

fn watch(
    shared: &Arc<Shared>,
    kind: &'static Kind,
    ns: Option<&str>,
    query: &HashMap<String, String>,
) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(status) => return error_response(&status),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let ns = ns.map(str::to_string);
    let wanted = move |resource: &str, object: &Value| {
        resource == kind.resource
            && ns
                .as_deref()
                .is_none_or(|ns| meta(object, "namespace").as_deref() == Some(ns))
            && labels.matches(object)
            && fields.matches(object)
    };
    let rv = query.get("resourceVersion").cloned().unwrap_or_default();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut first = Vec::new();
    let mut live = {
        let store = lock(&shared.store);
        if shared.take_expired_watch(kind.resource) {
            let status = auth::expired(rv.parse().unwrap_or(0), rv.parse::<u64>().unwrap_or(0) + 1);
            first.push(json!({"type": "ERROR", "object": status}).to_string() + "\n");
            None
        } else if rv.is_empty() || rv == "0" {
            for object in store.list(
                kind.resource,
                None,
                &LabelSelector::default(),
                &FieldSelector::default(),
            ) {
                if wanted(kind.resource, &object) {
                    first.push(json!({"type": "ADDED", "object": object}).to_string() + "\n");
                }
            }
            Some(store.subscribe())
        } else {
            let Ok(from) = rv.parse::<u64>() else {
                return error_response(&auth::bad_request(&format!(
                    "invalid resource version: {rv}"
                )));
            };
            match store.since(from) {
                Ok((events, receiver)) => {
                    for event in events {
                        if wanted(event.resource, &event.object) {
                            first.push(event.line());
                        }
                    }
                    Some(receiver)
                }
                Err(oldest) => {
                    let status = auth::expired(from, oldest);
                    first.push(json!({"type": "ERROR", "object": status}).to_string() + "\n");
                    None
                }
            }
        }
    };
    let open = OpenWatch::new(shared.clone(), kind.resource);
    tokio::spawn(async move {
        let _open = open;
        for line in first {
            if lines_tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        let Some(live) = live.as_mut() else {
            return;
        };
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = lines_tx.closed() => return,
                event = live.recv() => match event {
                    Ok(event) => {
                        if wanted(event.resource, &event.object)
                            && lines_tx.send(Bytes::from(event.line())).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let status = auth::expired(0, 0);
                        let line = json!({"type": "ERROR", "object": status}).to_string() + "\n";
                        let _ = lines_tx.send(Bytes::from(line)).await;
                        return;
                    }
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| {
        lines_rx
            .poll_recv(cx)
            .map(|line| line.map(Ok::<Bytes, Infallible>))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn parse_object(body: &[u8]) -> Result<Value, Value> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        auth::bad_request(&format!(
            "the body of the request was in an unknown format: {e}"
        ))
    })?;
    if !value.is_object() {
        return Err(auth::bad_request(
            "the body of the request is not a JSON object",
        ));
    }
    Ok(value)
}

/// Fills in apiVersion and kind from the path, as the apiserver's decoder does, and refuses a
/// body of another kind.
fn own_kind(kind: &Kind, object: &mut Value) -> Result<(), Value> {
    let api_version = kind.api_version();
    match object.get("kind").and_then(Value::as_str) {
        None | Some("") => object["kind"] = json!(kind.kind),
        Some(k) if k == kind.kind => {}
        Some(other) => {
            return Err(auth::bad_request(&format!(
                "the API version in the data ({}) does not match the expected API version ({api_version}), or kind {other} is not {}",
                object
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                kind.kind
            )));
        }
    }
    match object.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => object["apiVersion"] = json!(api_version),
        Some(v) if v == api_version => {}
        Some(other) => {
            return Err(auth::bad_request(&format!(
                "the API version in the data ({other}) does not match the expected API version ({api_version})"
            )));
        }
    }
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    Ok(())
}

fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Every field of `input` that `output` lacks, as paths like `spec.containers[0].foo`.
fn lost_fields(input: &Value, output: &Value, path: &str, lost: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (key, value) in i {
                if value.is_null() {
                    continue;
                }
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match o.get(key) {
                    None => lost.push(here),
                    Some(out) => lost_fields(value, out, &here, lost),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (index, (value, out)) in i.iter().zip(o).enumerate() {
                lost_fields(value, out, &format!("{path}[{index}]"), lost);
            }
        }
        _ => {}
    }
}

/// Decodes the object into its k8s-openapi type and back: what is stored and served is exactly
/// what the typed clients read. Under `fieldValidation=Strict` any field lost on the way is a 400.
fn typed(kind: &Kind, object: &Value, strict: bool) -> Result<Value, Value> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    let decoded = match kind.kind {
        "Pod" => round_trip::<core::Pod>(object),
        "Secret" => round_trip::<core::Secret>(object),
        "ServiceAccount" => round_trip::<core::ServiceAccount>(object),
        "ConfigMap" => round_trip::<core::ConfigMap>(object),
        "Namespace" => round_trip::<core::Namespace>(object),
        "Deployment" => round_trip::<apps::Deployment>(object),
        "Role" => round_trip::<rbac::Role>(object),
        "RoleBinding" => round_trip::<rbac::RoleBinding>(object),
        other => unreachable!("{other} is served"),
    };
    let prefix = format!(
        "{} in version \"{}\" cannot be handled as a {}",
        kind.kind, kind.version, kind.kind
    );
    let output = decoded.map_err(|e| auth::bad_request(&format!("{prefix}: {e}")))?;
    if strict {
        let mut lost = Vec::new();
        lost_fields(object, &output, "", &mut lost);
        if !lost.is_empty() {
            let fields: Vec<String> = lost
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(auth::bad_request(&format!(
                "{prefix}: strict decoding error: {}",
                fields.join(", ")
            )));
        }
    }
    Ok(output)
}

/// Secrets: `stringData` is write-only; it lands base64-encoded in `data`.
fn fold_string_data(kind: &Kind, object: &mut Value) {
    if kind.kind != "Secret" {
        return;
    }
    let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !object.get("data").is_some_and(Value::is_object) {
        object["data"] = json!({});
    }
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default().as_bytes().to_vec();
        let encoded = serde_json::to_value(k8s_openapi::ByteString(text)).expect("base64");
        object["data"][key] = encoded;
    }
}

fn validate_pod(kind: &Kind, name: &str, object: &Value) -> Result<(), Value> {
    if kind.kind != "Pod" {
        return Ok(());
    }
    let containers = object
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let invalid = |field: &str| auth::invalid("Pod", "", "pods", name, field, "Required value");
    if containers.is_empty() {
        return Err(invalid("spec.containers"));
    }
    for (i, container) in containers.iter().enumerate() {
        for field in ["name", "image"] {
            if container
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(invalid(&format!("spec.containers[{i}].{field}")));
            }
        }
    }
    Ok(())
}

/// A request's body as an object of `kind`, as the apiserver's decoder reads it.
fn decode_body(kind: &Kind, body: &[u8]) -> Result<Value, Value> {
    let mut object = parse_object(body)?;
    own_kind(kind, &mut object)?;
    Ok(object)
}

/// The object as it is stored: through its type (strictly under `fieldValidation=Strict`), with
/// a Secret's `stringData` folded into `data`.
fn storable(kind: &Kind, object: &Value, query: &HashMap<String, String>) -> Result<Value, Value> {
    let strict = query.get("fieldValidation").map(String::as_str) == Some("Strict");
    let mut object = typed(kind, object, strict)?;
    fold_string_data(kind, &mut object);
    Ok(object)
}

pub(crate) fn create(
    shared: &Arc<Shared>,
    kind: &'static Kind,
    ns: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    let object = decode_body(kind, body)?;
    if kind.namespaced {
        match meta(&object, "namespace") {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(auth::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
    }
    let mut object = storable(kind, &object, query)?;
    let mut store = lock(&shared.store);
    let Some(name) = store.name_for(kind.resource, ns, &object) else {
        return Err(auth::invalid(
            kind.kind,
            kind.group,
            kind.resource,
            "",
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    };
    validate_pod(kind, &name, &object)?;
    if store.get(kind.resource, ns, &name).is_some() {
        return Err(auth::already_exists(kind.group, kind.resource, &name));
    }
    match kind.kind {
        "Namespace" => object["status"] = json!({"phase": "Active"}),
        "Pod" => {
            let spec = &mut object["spec"];
            if spec
                .get("serviceAccountName")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                spec["serviceAccountName"] = json!("default");
            }
            spec["serviceAccount"] = spec["serviceAccountName"].clone();
            if spec.get("restartPolicy").is_none() {
                spec["restartPolicy"] = json!("Always");
            }
            if spec.get("terminationGracePeriodSeconds").is_none() {
                spec["terminationGracePeriodSeconds"] = json!(30);
            }
            object["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        _ => {}
    }
    let created = store.create(kind.resource, ns, &name, object);
    drop(store);
    if kind.kind == "Pod" {
        kubelet::spawn(
            shared.clone(),
            ns.to_string(),
            name,
            meta(&created, "uid").unwrap_or_default(),
        );
    }
    Ok((201, created))
}

/// Keeps what clients cannot change: identity, timestamps and (for pods) the kubelet's fields.
fn keep_server_fields(kind: &Kind, current: &Value, object: &mut Value) {
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match current["metadata"].get(field) {
            Some(value) => object["metadata"][field] = value.clone(),
            None => {
                if let Some(m) = object["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if kind.kind == "Pod" {
        object["status"] = current["status"].clone();
        for field in ["nodeName", "serviceAccountName", "serviceAccount"] {
            if let Some(value) = current["spec"].get(field) {
                object["spec"][field] = value.clone();
            }
        }
    }
}

fn update(
    shared: &Shared,
    kind: &'static Kind,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    let mut object = decode_body(kind, body)?;
    let mut store = lock(&shared.store);
    let current = store
        .get(kind.resource, ns, name)
        .cloned()
        .ok_or_else(|| auth::not_found(kind.group, kind.resource, name))?;
    if let Some(given) = meta(&object, "resourceVersion").filter(|v| !v.is_empty())
        && Some(given) != meta(&current, "resourceVersion")
    {
        return Err(auth::conflict(kind.group, kind.resource, name, auth::STALE));
    }
    keep_server_fields(kind, &current, &mut object);
    let object = storable(kind, &object, query)?;
    Ok((
        200,
        store.write(kind.resource, ns, name, object, "MODIFIED"),
    ))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    shared: &Shared,
    kind: &'static Kind,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Answer {
    let strategic = match content_type {
        "application/merge-patch+json" => false,
        "application/strategic-merge-patch+json" => true,
        other => {
            return Err(auth::status(
                415,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (not {other})"
                ),
                None,
            ));
        }
    };
    let patch = parse_object(body)?;
    let mut store = lock(&shared.store);
    let current = store
        .get(kind.resource, ns, name)
        .cloned()
        .ok_or_else(|| auth::not_found(kind.group, kind.resource, name))?;
    if let Some(given) = patch
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && Some(given)
            != current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(auth::conflict(kind.group, kind.resource, name, auth::STALE));
    }
    let mut object = current.clone();
    if strategic {
        strategic_merge(&mut object, &patch);
    } else {
        merge_patch(&mut object, &patch);
    }
    keep_server_fields(kind, &current, &mut object);
    own_kind(kind, &mut object)?;
    let object = storable(kind, &object, query)?;
    Ok((
        200,
        store.write(kind.resource, ns, name, object, "MODIFIED"),
    ))
}

/// RFC 7386.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The key lists of objects merge by, in the Kubernetes types' patch strategies.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "ownerReferences" => Some("uid"),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        "conditions" => Some("type"),
        _ => None,
    }
}

/// The subset of strategic merge patch kubectl's client-side apply needs.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            map.remove(key);
            continue;
        }
        match (value, merge_key(key)) {
            (Value::Array(items), Some(by)) if items.iter().all(Value::is_object) => {
                let existing = map.entry(key.clone()).or_insert_with(|| json!([]));
                if !existing.is_array() {
                    *existing = json!([]);
                }
                let list = existing.as_array_mut().expect("an array");
                if items
                    .iter()
                    .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
                {
                    *list = items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect();
                    continue;
                }
                for item in items {
                    let id = item.get(by).cloned();
                    let position = id
                        .as_ref()
                        .and_then(|id| list.iter().position(|e| e.get(by) == Some(id)));
                    let deleting = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (position, deleting) {
                        (Some(p), true) => {
                            list.remove(p);
                        }
                        (None, true) => {}
                        (Some(p), false) => strategic_merge(&mut list[p], item),
                        (None, false) => {
                            let mut fresh = Value::Object(Map::new());
                            strategic_merge(&mut fresh, item);
                            list.push(fresh);
                        }
                    }
                }
            }
            (Value::Object(inner), _) => {
                if inner.get("$patch").and_then(Value::as_str) == Some("delete") {
                    map.remove(key);
                    continue;
                }
                strategic_merge(map.entry(key.clone()).or_insert(Value::Null), value);
            }
            _ => {
                map.insert(key.clone(), value.clone());
            }
        }
    }
}

fn delete(
    shared: &Arc<Shared>,
    kind: &'static Kind,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| auth::bad_request(&format!("invalid DeleteOptions: {e}")))?
    };
    let grace = query
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
        .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_i64));
    let mut policy = query.get("propagationPolicy").cloned().or_else(|| {
        options
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    if options.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
        policy = Some("Orphan".into());
    }
    let preconditions = options.get("preconditions");
    let uid = preconditions
        .and_then(|p| p.get("uid"))
        .and_then(Value::as_str);
    let rv = preconditions
        .and_then(|p| p.get("resourceVersion"))
        .and_then(Value::as_str);
    store::delete_object(shared, kind, ns, name, grace, policy.as_deref(), uid, rv)
        .map(|o| (200, o))
}

async fn logs(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
) -> Response {
    let pod = lock(&shared.store).get("pods", ns, name).cloned();
    let Some(pod) = pod else {
        return error_response(&auth::not_found("", "pods", name));
    };
    let container = match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) => c.clone(),
        None => pod
            .pointer("/spec/containers/0/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    let tail = query.get("tailLines").and_then(|t| t.parse::<u64>().ok());
    match kubelet::logs(
        shared,
        &meta(&pod, "uid").unwrap_or_default(),
        &container,
        tail,
    )
    .await
    {
        Some(text) => {
            let mut response = Response::new(Body::from(text));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
        None => error_response(&auth::bad_request(&format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
        ))),
    }
}

/// The OpenAPI v3 group-versions: path, group, version.
const GROUP_VERSIONS: &[(&str, &str, &str)] = &[
    ("api/v1", "", "v1"),
    ("apis/apps/v1", "apps", "v1"),
    (
        "apis/rbac.authorization.k8s.io/v1",
        "rbac.authorization.k8s.io",
        "v1",
    ),
];

fn resource_list(group: &str, version: &str) -> Value {
    let mut resources: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .map(|k| {
            json!({
                "name": k.resource,
                "singularName": k.singular,
                "namespaced": k.namespaced,
                "kind": k.kind,
                "shortNames": k.short_names,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    if group.is_empty() {
        resources.push(json!({
            "name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"],
        }));
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn openapi_document(group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let parameters =
        json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]);
    for kind in KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let gvk = json!({"group": group, "version": version, "kind": kind.kind});
        let operation = json!({
            "x-kubernetes-group-version-kind": gvk,
            "parameters": parameters,
            "responses": {},
        });
        let collection = if kind.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", kind.resource)
        } else {
            format!("{prefix}/{}", kind.resource)
        };
        paths.insert(collection.clone(), json!({"post": operation}));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"patch": operation, "put": operation}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
    })
}

/// The documents open to any authenticated caller.
fn discovery(path: &str, headers: &HeaderMap) -> Option<Value> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let groups = || {
        let mut seen = Vec::new();
        for kind in KINDS.iter().filter(|k| !k.group.is_empty()) {
            if !seen.contains(&kind.group) {
                seen.push(kind.group);
            }
        }
        seen
    };
    let group_doc = |group: &str| {
        let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv})
    };
    Some(match path {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-flame-emulator", "gitCommit": "0",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        }),
        "/apis" => json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": groups().into_iter().map(group_doc).collect::<Vec<_>>(),
        }),
        "/api/v1" => resource_list("", "v1"),
        "/openapi/v3" => {
            let mut paths = Map::new();
            for (gv, _, _) in GROUP_VERSIONS {
                paths.insert(
                    gv.to_string(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=emulator1")}),
                );
            }
            json!({"paths": paths})
        }
        _ => {
            if let Some(gv) = path.strip_prefix("/openapi/v3/") {
                let (_, group, version) = GROUP_VERSIONS.iter().find(|(p, _, _)| *p == gv)?;
                return Some(openapi_document(group, version));
            }
            let rest = path.strip_prefix("/apis/")?;
            match rest.split_once('/') {
                None if groups().contains(&rest) => group_doc(rest),
                Some((group, "v1")) if groups().contains(&group) => resource_list(group, "v1"),
                _ => return None,
            }
        }
    })
}

/// Counts a watch as open (`Emulator::open_watches`) until its stream ends.
struct OpenWatch {
    shared: Arc<Shared>,
    resource: &'static str,
}

impl OpenWatch {
    fn new(shared: Arc<Shared>, resource: &'static str) -> OpenWatch {
        *lock(&shared.watches).entry(resource).or_default() += 1;
        OpenWatch { shared, resource }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if let Some(open) = lock(&self.shared.watches).get_mut(self.resource) {
            *open -= 1;
        }
    }
}
