//! Objects, the one resourceVersion counter, the event log watches replay from, selectors, and
//! the owner-reference bookkeeping garbage collection needs.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// How many events a watch can replay from: an older resourceVersion gets 410 Expired.
const EVENT_LOG: usize = 1000;

/// A kind the emulator serves.
#[derive(Debug)]
pub(crate) struct Kind {
    pub(crate) resource: &'static str,
    pub(crate) singular: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) namespaced: bool,
    pub(crate) short_names: &'static [&'static str],
}

impl Kind {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub(crate) const KINDS: &[Kind] = &[
    Kind {
        resource: "pods",
        singular: "pod",
        kind: "Pod",
        group: "",
        version: "v1",
        namespaced: true,
        short_names: &["po"],
    },
    Kind {
        resource: "secrets",
        singular: "secret",
        kind: "Secret",
        group: "",
        version: "v1",
        namespaced: true,
        short_names: &[],
    },
    Kind {
        resource: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        group: "",
        version: "v1",
        namespaced: true,
        short_names: &["sa"],
    },
    Kind {
        resource: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        group: "",
        version: "v1",
        namespaced: true,
        short_names: &["cm"],
    },
    Kind {
        resource: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        group: "",
        version: "v1",
        namespaced: false,
        short_names: &["ns"],
    },
    Kind {
        resource: "deployments",
        singular: "deployment",
        kind: "Deployment",
        group: "apps",
        version: "v1",
        namespaced: true,
        short_names: &["deploy"],
    },
    Kind {
        resource: "roles",
        singular: "role",
        kind: "Role",
        group: "rbac.authorization.k8s.io",
        version: "v1",
        namespaced: true,
        short_names: &[],
    },
    Kind {
        resource: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        group: "rbac.authorization.k8s.io",
        version: "v1",
        namespaced: true,
        short_names: &[],
    },
];

pub(crate) fn kind_of(group: &str, version: &str, resource: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.resource == resource)
}

pub(crate) fn kind_by_resource(resource: &str) -> &'static Kind {
    KINDS
        .iter()
        .find(|k| k.resource == resource)
        .expect("a served resource")
}

/// One change, as watches see it.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) resource: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) object: Value,
}

impl Event {
    pub(crate) fn line(&self) -> String {
        let mut line = json!({"type": self.kind, "object": self.object}).to_string();
        line.push('\n');
        line
    }
}

type Key = (&'static str, String, String);

/// The logged events a watch replays, and the receiver for the ones after them.
pub(crate) type Replay = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// Every object, keyed by (resource, namespace, name); cluster-scoped ones have namespace "".
pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    log: VecDeque<Arc<Event>>,
    /// The highest resourceVersion whose event fell out of the log.
    evicted: u64,
    tx: broadcast::Sender<Arc<Event>>,
}

pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes
}

pub(crate) fn random_hex(len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        for b in random_bytes::<16>() {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out.truncate(len);
    out
}

fn uuid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The apiserver's suffix alphabet for generateName (no vowels, so no words).
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

pub(crate) fn meta(object: &Value, field: &str) -> Option<String> {
    object
        .pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

impl Store {
    pub(crate) fn new() -> Store {
        Store {
            objects: BTreeMap::new(),
            rv: 0,
            log: VecDeque::new(),
            evicted: 0,
            tx: broadcast::channel(8192).0,
        }
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    pub(crate) fn get(&self, resource: &'static str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource, ns.to_string(), name.to_string()))
    }

    /// Picks the name of a new object (from generateName if it has none).
    pub(crate) fn name_for(
        &self,
        resource: &'static str,
        ns: &str,
        object: &Value,
    ) -> Option<String> {
        if let Some(name) = meta(object, "name").filter(|n| !n.is_empty()) {
            return Some(name);
        }
        let prefix = meta(object, "generateName").filter(|n| !n.is_empty())?;
        loop {
            let name = format!("{prefix}{}", name_suffix());
            if self.get(resource, ns, &name).is_none() {
                return Some(name);
            }
        }
    }

    /// Stores a new object, filling in what the server owns. The caller checked the name is free.
    pub(crate) fn create(
        &mut self,
        resource: &'static str,
        ns: &str,
        name: &str,
        mut object: Value,
    ) -> Value {
        let metadata = object
            .as_object_mut()
            .expect("an object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        let metadata = metadata.as_object_mut().expect("metadata is an object");
        metadata.insert("name".into(), json!(name));
        if !ns.is_empty() {
            metadata.insert("namespace".into(), json!(ns));
        }
        metadata.insert("uid".into(), json!(uuid()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.remove("deletionTimestamp");
        metadata.remove("deletionGracePeriodSeconds");
        self.write(resource, ns, name, object, "ADDED")
    }

    /// Replaces an object (or adds it), with a new resourceVersion and an event.
    pub(crate) fn write(
        &mut self,
        resource: &'static str,
        ns: &str,
        name: &str,
        mut object: Value,
        kind: &'static str,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .insert((resource, ns.to_string(), name.to_string()), object.clone());
        self.record(resource, kind, object.clone());
        object
    }

    pub(crate) fn remove(&mut self, resource: &'static str, ns: &str, name: &str) -> Option<Value> {
        let mut object = self
            .objects
            .remove(&(resource, ns.to_string(), name.to_string()))?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(resource, "DELETED", object.clone());
        Some(object)
    }

    fn record(&mut self, resource: &'static str, kind: &'static str, object: Value) {
        let event = Arc::new(Event {
            rv: self.rv,
            resource,
            kind,
            object,
        });
        self.log.push_back(event.clone());
        while self.log.len() > EVENT_LOG {
            if let Some(old) = self.log.pop_front() {
                self.evicted = old.rv;
            }
        }
        let _ = self.tx.send(event);
    }

    /// Objects of `resource`, in `ns` (every namespace if None), matching the selectors.
    pub(crate) fn list(
        &self,
        resource: &'static str,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| *r == resource && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .filter(|v| labels.matches(v) && fields.matches(v))
            .cloned()
            .collect()
    }

    /// The events after `rv` still in the log, and a receiver for later ones, taken together so
    /// none falls between them. `Err` holds the oldest resourceVersion still replayable.
    pub(crate) fn since(&self, rv: u64) -> Result<Replay, u64> {
        if rv < self.evicted {
            return Err(self.evicted + 1);
        }
        let events = self.log.iter().filter(|e| e.rv > rv).cloned().collect();
        Ok((events, self.tx.subscribe()))
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Every object in `ns` whose ownerReferences name no live uid: the garbage collector's
    /// work list.
    pub(crate) fn orphans(&self, ns: &str) -> Vec<(&'static str, String, String)> {
        let live: HashSet<&str> = self
            .objects
            .values()
            .filter_map(|v| v.pointer("/metadata/uid").and_then(Value::as_str))
            .collect();
        self.objects
            .iter()
            .filter(|((_, n, _), _)| n == ns)
            .filter(|(_, v)| v.pointer("/metadata/deletionTimestamp").is_none())
            .filter(|(_, v)| {
                let refs = v
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                !refs.is_empty()
                    && refs.iter().all(|r| {
                        !r.get("uid")
                            .and_then(Value::as_str)
                            .is_some_and(|u| live.contains(u))
                    })
            })
            .map(|((r, _, name), v)| (*r, name.clone(), meta(v, "uid").unwrap_or_default()))
            .collect()
    }

    /// Removes references to `owner` from every object in `ns` (propagationPolicy Orphan).
    pub(crate) fn strip_owner(&mut self, ns: &str, owner: &str) {
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|((_, n, _), v)| {
                n == ns
                    && v.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r.get("uid").and_then(Value::as_str) == Some(owner))
                        })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (resource, n, name) in keys {
            let mut object = self.objects[&(resource, n.clone(), name.clone())].clone();
            if let Some(refs) = object
                .pointer_mut("/metadata/ownerReferences")
                .and_then(Value::as_array_mut)
            {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner));
                if refs.is_empty() {
                    object["metadata"]
                        .as_object_mut()
                        .expect("metadata")
                        .remove("ownerReferences");
                }
            }
            self.write(resource, &n, &name, object, "MODIFIED");
        }
    }
}

/// A label selector: requirements joined by commas, all of which must hold.
#[derive(Debug, Default)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

#[derive(Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_values(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set, found {rest:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_values(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_values(rest)?)
            } else if part.contains(' ') || part.contains('(') {
                return Err(format!("unable to parse requirement: {part:?}"));
            } else {
                LabelReq::Exists(part)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::Ne(k, v) => label(k) != Some(v),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }
}

/// A field selector over the fields the apiserver indexes for pods (and metadata for all kinds).
#[derive(Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let (field, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !matches!(
                field,
                "metadata.name" | "metadata.namespace" | "status.phase" | "spec.nodeName"
            ) {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let actual = object
                .pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

/// Deletes an object as the apiserver does. A pod with a kubelet only gets its deletionTimestamp
/// here; the kubelet stops its containers and removes it. Everything else goes at once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn delete_object(
    shared: &Arc<crate::Shared>,
    kind: &'static Kind,
    ns: &str,
    name: &str,
    grace: Option<i64>,
    policy: Option<&str>,
    uid_precondition: Option<&str>,
    rv_precondition: Option<&str>,
) -> Result<Value, Value> {
    use crate::auth;
    let mut store = crate::lock(&shared.store);
    let current = store
        .get(kind.resource, ns, name)
        .cloned()
        .ok_or_else(|| auth::not_found(kind.group, kind.resource, name))?;
    let uid = meta(&current, "uid").unwrap_or_default();
    if let Some(wanted) = uid_precondition
        && wanted != uid
    {
        return Err(auth::conflict(
            kind.group,
            kind.resource,
            name,
            &format!(
                "Precondition failed: UID in precondition: {wanted}, UID in object meta: {uid}"
            ),
        ));
    }
    let rv = meta(&current, "resourceVersion").unwrap_or_default();
    if let Some(wanted) = rv_precondition
        && wanted != rv
    {
        return Err(auth::conflict(
            kind.group,
            kind.resource,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {wanted}, ResourceVersion in object meta: {rv}"
            ),
        ));
    }
    if policy == Some("Orphan") {
        crate::lock(&shared.orphaning).insert(uid.clone());
    }
    if kind.resource == "pods" {
        let pods = crate::lock(&shared.pods);
        if let Some(control) = pods.get(&uid) {
            let grace = grace
                .or_else(|| {
                    current
                        .pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0);
            let pending = current
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            // A second delete may only shorten the grace (a force delete after a graceful one).
            if pending.is_some_and(|p| p <= grace) {
                return Ok(current);
            }
            let mut object = current;
            let at = k8s_openapi::jiff::Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(grace))
                .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
            object["metadata"]["deletionTimestamp"] =
                json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            let object = store.write(kind.resource, ns, name, object, "MODIFIED");
            let _ = control.delete.send(Some(grace));
            return Ok(object);
        }
    }
    let removed = store.remove(kind.resource, ns, name);
    drop(store);
    removed_hook(shared, ns, &uid);
    removed.ok_or_else(|| auth::not_found(kind.group, kind.resource, name))
}

/// After an object is gone: orphan its dependents if asked to, else collect the garbage.
pub(crate) fn removed_hook(shared: &Arc<crate::Shared>, ns: &str, uid: &str) {
    if crate::lock(&shared.orphaning).remove(uid) {
        crate::lock(&shared.store).strip_owner(ns, uid);
    }
    if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let orphans = crate::lock(&shared.store).orphans(ns);
    for (resource, name, uid) in orphans {
        delete_in_background(shared, resource, ns, &name, &uid);
    }
}

/// Deletes the object a controller decided to remove, as the collector does: in the background,
/// with its own grace, and only if `uid` still names it (gone or replaced meanwhile: nothing).
pub(crate) fn delete_in_background(
    shared: &Arc<crate::Shared>,
    resource: &str,
    ns: &str,
    name: &str,
    uid: &str,
) {
    let _ = delete_object(
        shared,
        kind_by_resource(resource),
        ns,
        name,
        None,
        Some("Background"),
        Some(uid),
        None,
    );
}
