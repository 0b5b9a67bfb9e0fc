//! Bearer tokens, RBAC over Roles and RoleBindings, and the Status bodies every error is.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::store::{FieldSelector, LabelSelector, Store};

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Identity {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

impl Identity {
    fn user(&self) -> String {
        match self {
            Identity::Admin => "admin".into(),
            Identity::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// The tokens the emulator accepts.
pub(crate) struct Tokens {
    admin: String,
    by_token: HashMap<String, Identity>,
    by_account: HashMap<(String, String), String>,
}

impl Tokens {
    pub(crate) fn new() -> Tokens {
        Tokens {
            admin: format!("emu-admin-{}", crate::store::random_hex(32)),
            by_token: HashMap::new(),
            by_account: HashMap::new(),
        }
    }

    pub(crate) fn admin(&self) -> &str {
        &self.admin
    }

    /// The token of a service account, minted on first use.
    pub(crate) fn service_account(&mut self, namespace: &str, name: &str) -> String {
        let key = (namespace.to_string(), name.to_string());
        if let Some(token) = self.by_account.get(&key) {
            return token.clone();
        }
        let token = format!("emu-sa-{}", crate::store::random_hex(32));
        self.by_account.insert(key, token.clone());
        self.by_token.insert(
            token.clone(),
            Identity::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
            },
        );
        token
    }

    pub(crate) fn identify(&self, token: &str) -> Option<Identity> {
        if token == self.admin {
            return Some(Identity::Admin);
        }
        self.by_token.get(token).cloned()
    }
}

/// What a request wants to do, in RBAC's terms.
#[derive(Debug)]
pub(crate) struct Attributes<'a> {
    pub(crate) verb: &'a str,
    pub(crate) group: &'a str,
    /// With the subresource, as rules name it: `pods/log`.
    pub(crate) resource: &'a str,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) name: Option<&'a str>,
}

fn listed(list: Option<&Value>, wanted: &str) -> bool {
    list.and_then(Value::as_array).is_some_and(|items| {
        items
            .iter()
            .any(|i| i.as_str() == Some("*") || i.as_str() == Some(wanted))
    })
}

/// Allows what a RoleBinding in the request's namespace grants the caller through its Role.
pub(crate) fn authorize(
    store: &Store,
    who: &Identity,
    attrs: &Attributes<'_>,
) -> Result<(), Value> {
    let Identity::ServiceAccount { namespace, name } = who else {
        return Ok(());
    };
    let allowed = attrs.namespace.is_some_and(|ns| {
        let bindings = store.list(
            "rolebindings",
            Some(ns),
            &LabelSelector::default(),
            &FieldSelector::default(),
        );
        bindings.iter().any(|binding| {
            let bound = binding
                .get("subjects")
                .and_then(Value::as_array)
                .is_some_and(|subjects| {
                    subjects.iter().any(|s| {
                        s.get("kind").and_then(Value::as_str) == Some("ServiceAccount")
                            && s.get("name").and_then(Value::as_str) == Some(name)
                            && s.get("namespace").and_then(Value::as_str).unwrap_or(ns) == namespace
                    })
                });
            let role_ref = binding.get("roleRef");
            if !bound
                || role_ref.and_then(|r| r.get("kind")).and_then(Value::as_str) != Some("Role")
            {
                return false;
            }
            let Some(role) = role_ref
                .and_then(|r| r.get("name"))
                .and_then(Value::as_str)
                .and_then(|role| store.get("roles", ns, role))
            else {
                return false;
            };
            role.get("rules")
                .and_then(Value::as_array)
                .is_some_and(|rules| {
                    rules.iter().any(|rule| {
                        let names_ok = match rule.get("resourceNames").and_then(Value::as_array) {
                            Some(names) if !names.is_empty() => attrs
                                .name
                                .is_some_and(|n| names.iter().any(|x| x.as_str() == Some(n))),
                            _ => true,
                        };
                        listed(rule.get("apiGroups"), attrs.group)
                            && listed(rule.get("resources"), attrs.resource)
                            && listed(rule.get("verbs"), attrs.verb)
                            && names_ok
                    })
                })
        })
    });
    if allowed {
        return Ok(());
    }
    let what = qualified(attrs.group, attrs.resource);
    let subject = match attrs.name {
        Some(n) => format!("{what} \"{n}\""),
        None => what,
    };
    let scope = match attrs.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let message = format!(
        "{subject} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        who.user(),
        attrs.verb,
        attrs.resource,
        attrs.group
    );
    Err(status(
        403,
        "Forbidden",
        &message,
        details(attrs.name, attrs.group, attrs.resource),
    ))
}

/// A `Status` with `status: Failure`.
pub(crate) fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    body
}

pub(crate) fn details(name: Option<&str>, group: &str, kind: &str) -> Option<Value> {
    let mut d = json!({"kind": kind});
    if let Some(name) = name {
        d["name"] = json!(name);
    }
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    Some(d)
}

pub(crate) fn unauthorized() -> Value {
    status(401, "Unauthorized", "Unauthorized", None)
}

pub(crate) fn not_found(group: &str, resource: &str, name: &str) -> Value {
    let what = qualified(group, resource);
    status(
        404,
        "NotFound",
        &format!("{what} \"{name}\" not found"),
        details(Some(name), group, resource),
    )
}

pub(crate) fn no_route() -> Value {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

pub(crate) fn already_exists(group: &str, resource: &str, name: &str) -> Value {
    let what = qualified(group, resource);
    status(
        409,
        "AlreadyExists",
        &format!("{what} \"{name}\" already exists"),
        details(Some(name), group, resource),
    )
}

pub(crate) fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Value {
    let what = qualified(group, resource);
    status(
        409,
        "Conflict",
        &format!("Operation cannot be fulfilled on {what} \"{name}\": {why}"),
        details(Some(name), group, resource),
    )
}

pub(crate) const STALE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

pub(crate) fn bad_request(message: &str) -> Value {
    status(400, "BadRequest", message, None)
}

pub(crate) fn invalid(
    kind: &str,
    group: &str,
    resource: &str,
    name: &str,
    field: &str,
    problem: &str,
) -> Value {
    let message = format!("{kind} \"{name}\" is invalid: {field}: {problem}");
    let mut d = details(Some(name), group, resource).expect("details");
    d["kind"] = json!(kind);
    d["causes"] = json!([{"reason": "FieldValueRequired", "message": problem, "field": field}]);
    status(422, "Invalid", &message, Some(d))
}

pub(crate) fn expired(rv: u64, oldest: u64) -> Value {
    status(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({oldest})"),
        None,
    )
}

/// `pods` in the core group, `deployments.apps` elsewhere, as the apiserver names them.
fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}
