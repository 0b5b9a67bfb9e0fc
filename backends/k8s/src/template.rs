//! The parent's pod, made into a runner's: what is copied, what is dropped, and why.

use std::collections::BTreeMap;
use std::sync::Arc;

use flame::{Error, ErrorKind};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, Pod, PodSpec, ResourceRequirements, Secret, SecretKeySelector,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::{LABEL_MANAGED_BY, LABEL_PARENT, LABEL_POOL, LABEL_RUNNER, MANAGED_BY};

/// Changes a runner pod just before it is created: the last word on its spec.
pub(crate) type PodHook = Arc<dyn Fn(&mut Pod) + Send + Sync>;

/// The builder's say on runner pods.
#[derive(Clone, Default)]
pub(crate) struct Knobs {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) annotations: BTreeMap<String, String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) resources: Option<ResourceRequirements>,
    pub(crate) node_selector: BTreeMap<String, String>,
    pub(crate) tolerations: Vec<Toleration>,
    pub(crate) runtime_class: Option<String>,
    pub(crate) runner_api_access: bool,
    /// Parent volumes runners mount whatever their kind (a shared claim).
    pub(crate) shared_volumes: Vec<String>,
    pub(crate) hook: Option<PodHook>,
}

/// A runner pod ready but for its name, labels and hand-off: made once per backend from the
/// parent's pod.
#[derive(Clone)]
pub(crate) struct Template {
    base: Pod,
    /// The app container's name, in the parent and in runners.
    pub(crate) container: String,
    owner: OwnerReference,
    parent_uid: String,
    hook: Option<PodHook>,
    labels: BTreeMap<String, String>,
}

/// The app container of `pod`: the one named, else the only one.
pub(crate) fn app_container<'a>(
    pod: &'a Pod,
    wanted: Option<&str>,
) -> Result<&'a Container, Error> {
    let containers = pod
        .spec
        .as_ref()
        .map(|spec| spec.containers.as_slice())
        .unwrap_or_default();
    let names = || {
        containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (wanted, containers) {
        (Some(wanted), _) => containers.iter().find(|c| c.name == wanted).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "the parent's pod has no container {wanted:?} (it has: {})",
                    names()
                ),
            )
        }),
        (None, [only]) => Ok(only),
        (None, []) => Err(Error::new(
            ErrorKind::Config,
            "the parent's pod has no containers to clone runners from",
        )),
        (None, _) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "the parent's pod has several containers ({}): say which one runs the app with \
                 K8sBackendBuilder::container",
                names()
            ),
        )),
    }
}

/// The image the parent runs, pinned by digest when the status has it, so that a rolling
/// deploy that moves the tag never pairs a parent with runners of another build. The digest
/// goes on the spec's own repository: the status may name a mirror the runner's node has no
/// credentials for.
fn pinned_image(pod: &Pod, container: &Container) -> Option<(String, bool)> {
    let spec_image = container.image.clone()?;
    // An app that never pulls runs what was preloaded on its nodes, which a node may hold by
    // tag only: a digest reference would then fail with ErrImageNeverPull.
    if spec_image.contains("@sha256:") || container.image_pull_policy.as_deref() == Some("Never") {
        return Some((spec_image.clone(), spec_image.contains("@sha256:")));
    }
    let statuses = pod.status.as_ref()?.container_statuses.as_deref();
    let digest = statuses
        .unwrap_or_default()
        .iter()
        .find(|s| s.name == container.name)
        .map(|s| s.image_id.trim_start_matches("docker-pullable://"))
        .filter(|id| is_digest_ref(id))
        .and_then(|id| id.split_once("@sha256:"))
        .map(|(_, hex)| hex);
    Some(match digest {
        Some(hex) => (format!("{}@sha256:{hex}", without_tag(&spec_image)), true),
        None => (spec_image, false),
    })
}

/// `registry:5000/app:1.2` → `registry:5000/app`: a tag is what follows the last `:` after
/// the last `/`.
fn without_tag(image: &str) -> &str {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

/// `<repository>@sha256:<64 hex digits>`: the only image id form a pod spec can name.
fn is_digest_ref(id: &str) -> bool {
    match id.split_once("@sha256:") {
        Some((repo, hex)) => {
            !repo.is_empty()
                && !repo.contains("://")
                && hex.len() == 64
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Volumes that mean the same in every pod, and those the builder shares. Claims and host
/// paths are shared state, so a runner mounts them only when asked; service-account tokens
/// (the auto-mounted one, or one projected by hand) only with `runner_api_access`, and the
/// auto-mounted one never, as the cluster adds its own then.
fn keeps(volume: &Volume, knobs: &Knobs) -> bool {
    if knobs.shared_volumes.contains(&volume.name) {
        return true;
    }
    let token = volume.name.starts_with("kube-api-access-")
        || (!knobs.runner_api_access
            && volume.projected.as_ref().is_some_and(|projected| {
                projected
                    .sources
                    .iter()
                    .flatten()
                    .any(|source| source.service_account_token.is_some())
            }));
    !token
        && (volume.config_map.is_some()
            || volume.secret.is_some()
            || volume.projected.is_some()
            || volume.downward_api.is_some()
            || volume.empty_dir.is_some()
            // Per pod too: an inline CSI volume (a secrets store) and an ephemeral claim,
            // made afresh for each pod.
            || volume.csi.is_some()
            || volume.ephemeral.is_some())
}

/// Kubernetes expands `$(NAME)` in an env value and turns `$$` into `$`; a value the builder
/// gives is meant as is, so every `$` is doubled.
fn literal(value: &str) -> String {
    value.replace('$', "$$")
}

/// The volumes a runner pod keeps (those its app container mounts, and shared ones) and the
/// app container's mounts of them. The sidecars' volumes stay with the parent.
fn runner_volumes(
    parent_spec: &PodSpec,
    app: &Container,
    knobs: &Knobs,
) -> (Vec<Volume>, Option<Vec<VolumeMount>>) {
    let mounted = |v: &Volume| app.volume_mounts.iter().flatten().any(|m| m.name == v.name);
    let volumes: Vec<Volume> = parent_spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| keeps(v, knobs) && (mounted(v) || knobs.shared_volumes.contains(&v.name)))
        .cloned()
        .collect();
    for dropped in parent_spec.volumes.iter().flatten().filter(|v| {
        mounted(v)
            && !volumes.iter().any(|kept| kept.name == v.name)
            && !v.name.starts_with("kube-api-access-")
    }) {
        tracing::info!(volume = %dropped.name, "flame: runner pods do not mount this volume of the app container: it is shared state (a claim, a host path) or an API token; K8sBackendBuilder::share_volume or runner_api_access mounts it");
    }
    let mounts = app.volume_mounts.as_ref().map(|mounts| {
        mounts
            .iter()
            .filter(|m| volumes.iter().any(|v| v.name == m.name))
            .cloned()
            .collect::<Vec<_>>()
    });
    (volumes, mounts)
}

/// The runner's environment: the app container's, without the hand-off variable, with the
/// builder's overrides in their variables' places and its additions after.
fn runner_env(app: &Container, knobs: &Knobs, handoff_key: &str) -> Vec<EnvVar> {
    // An override takes its variable's place: a later variable may refer to it as `$(NAME)`.
    let knob = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(literal(value)),
        value_from: None,
    };
    let mut env: Vec<EnvVar> = app
        .env
        .iter()
        .flatten()
        .filter(|e| e.name != handoff_key)
        .map(|e| match knobs.env.get(&e.name) {
            Some(value) => knob(&e.name, value),
            None => e.clone(),
        })
        .collect();
    let added: Vec<EnvVar> = knobs
        .env
        .iter()
        .filter(|(name, _)| !env.iter().any(|e| &e.name == *name))
        .map(|(name, value)| knob(name, value))
        .collect();
    env.extend(added);
    env
}

/// The runner's container: the app's image, command, environment and mounts, without its
/// probes, lifecycle hooks and ports.
fn runner_container(
    app: &Container,
    image: String,
    pinned: bool,
    env: Vec<EnvVar>,
    mounts: Option<Vec<VolumeMount>>,
    knobs: &Knobs,
) -> Container {
    // Probes would fail (a runner does not serve the app's endpoints) and kill it;
    // lifecycle hooks and ports belong to the serving app, not to a runner.
    Container {
        name: app.name.clone(),
        image: Some(image),
        // A digest never moves, so a node that has it need not ask the registry; an app
        // that never pulls (images preloaded on nodes) keeps it so.
        image_pull_policy: match app.image_pull_policy.as_deref() {
            Some("Never") => Some("Never".into()),
            _ if pinned => Some("IfNotPresent".into()),
            other => other.map(str::to_string),
        },
        command: app.command.clone(),
        args: app.args.clone(),
        env: Some(env),
        env_from: app.env_from.clone(),
        resources: knobs.resources.clone().or_else(|| app.resources.clone()),
        volume_mounts: mounts,
        working_dir: app.working_dir.clone(),
        security_context: app.security_context.clone(),
        ..Container::default()
    }
}

/// The runner pod's spec: the runner container, and what of the parent pod's spec places and
/// runs it (node selection, tolerations, node affinity, service account, DNS, security).
fn runner_pod_spec(
    parent_spec: &PodSpec,
    runner: Container,
    volumes: Vec<Volume>,
    knobs: &Knobs,
) -> PodSpec {
    let mut node_selector = parent_spec.node_selector.clone().unwrap_or_default();
    node_selector.extend(knobs.node_selector.clone());
    let mut tolerations = parent_spec.tolerations.clone().unwrap_or_default();
    tolerations.extend(knobs.tolerations.iter().cloned());
    // Only node affinity: the parent's pod (anti-)affinity is about the parent's replicas.
    let affinity = parent_spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.clone())
        .map(|node_affinity| k8s_openapi::api::core::v1::Affinity {
            node_affinity: Some(node_affinity),
            ..Default::default()
        });
    PodSpec {
        containers: vec![runner],
        // Migrations and other one-off setup run in the parent's init containers, never
        // again per runner.
        init_containers: None,
        restart_policy: Some("Never".into()),
        service_account_name: parent_spec.service_account_name.clone(),
        automount_service_account_token: Some(knobs.runner_api_access),
        // The services' variables are part of the app's config for apps that find their
        // peers by them: a runner sees what its parent sees.
        enable_service_links: parent_spec.enable_service_links,
        image_pull_secrets: parent_spec.image_pull_secrets.clone(),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity,
        security_context: parent_spec.security_context.clone(),
        priority_class_name: parent_spec.priority_class_name.clone(),
        runtime_class_name: knobs
            .runtime_class
            .clone()
            .or(parent_spec.runtime_class_name.clone()),
        dns_policy: parent_spec.dns_policy.clone(),
        dns_config: parent_spec.dns_config.clone(),
        termination_grace_period_seconds: parent_spec.termination_grace_period_seconds,
        volumes: (!volumes.is_empty()).then_some(volumes),
        ..PodSpec::default()
    }
}

impl Template {
    /// Makes the template from the parent's pod. `handoff_key` is the variable runners read
    /// their hand-off from; the parent's own value of it, if any, is not inherited.
    pub(crate) fn new(
        parent: &Pod,
        container: Option<&str>,
        knobs: &Knobs,
        handoff_key: &str,
    ) -> Result<Template, Error> {
        let app = app_container(parent, container)?;
        let (image, pinned) = pinned_image(parent, app).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("the parent's container {:?} names no image", app.name),
            )
        })?;
        let parent_spec = parent.spec.clone().unwrap_or_default();
        let (volumes, mounts) = runner_volumes(&parent_spec, app, knobs);
        let env = runner_env(app, knobs, handoff_key);
        let runner = runner_container(app, image, pinned, env, mounts, knobs);
        let spec = runner_pod_spec(&parent_spec, runner, volumes, knobs);
        let parent_name = parent.metadata.name.clone().unwrap_or_default();
        let parent_uid = parent.metadata.uid.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("the parent's pod {parent_name:?} has no uid"),
            )
        })?;
        // Never the parent's labels: a ReplicaSet adopts the pods its selector matches, and the
        // controller owner reference below is what stops it.
        let mut labels = knobs.labels.clone();
        labels.insert(LABEL_PARENT.into(), parent_uid.clone());
        labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
        let base = Pod {
            metadata: ObjectMeta {
                namespace: parent.metadata.namespace.clone(),
                annotations: (!knobs.annotations.is_empty()).then(|| knobs.annotations.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        };
        Ok(Template {
            base,
            container: app.name.clone(),
            owner: OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: parent_name,
                uid: parent_uid.clone(),
                // Stops adoption by any controller; blockOwnerDeletion would need finalizer
                // rights on pods, which the parent's Role does not grant.
                controller: Some(true),
                block_owner_deletion: None,
            },
            parent_uid,
            hook: knobs.hook.clone(),
            labels,
        })
    }

    /// The parent pod's uid, which runner pods and secrets carry in [`LABEL_PARENT`].
    pub(crate) fn parent_uid(&self) -> &str {
        &self.parent_uid
    }

    /// The name of the parent's pod.
    pub(crate) fn parent_name(&self) -> &str {
        &self.owner.name
    }

    /// The labels of one runner's pod and secret.
    pub(crate) fn labels(&self, pool: &str, runner_id: &str) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(LABEL_POOL.into(), label_value(pool));
        labels.insert(LABEL_RUNNER.into(), label_value(runner_id));
        labels
    }

    /// One runner's pod: the template, named, labelled, owned by the parent's pod, its
    /// hand-off read from the secret of the same name; then the pod hook.
    pub(crate) fn pod(&self, name: &str, pool: &str, runner_id: &str, handoff_key: &str) -> Pod {
        let mut pod = self.base.clone();
        pod.metadata.name = Some(name.into());
        pod.metadata.labels = Some(self.labels(pool, runner_id));
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_POOL.into(), pool.into());
        pod.metadata.owner_references = Some(vec![self.owner.clone()]);
        if let Some(spec) = pod.spec.as_mut() {
            for container in &mut spec.containers {
                container.env.get_or_insert_with(Vec::new).push(EnvVar {
                    name: handoff_key.into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: name.into(),
                            key: handoff_key.into(),
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                });
            }
        }
        if let Some(hook) = &self.hook {
            hook(&mut pod);
            // What flame-rt finds, owns and cleans the pod by is not the hook's to change: a
            // pod that lost them would run unwatched and outlive its parent.
            pod.metadata.name = Some(name.into());
            pod.metadata.namespace = self.base.metadata.namespace.clone();
            pod.metadata.owner_references = Some(vec![self.owner.clone()]);
            pod.metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .extend(self.labels(pool, runner_id).into_iter().filter(|(key, _)| {
                    [LABEL_PARENT, LABEL_MANAGED_BY, LABEL_POOL, LABEL_RUNNER]
                        .contains(&key.as_str())
                }));
        }
        pod
    }

    /// The secret holding one runner's hand-off. It starts owned by the parent's pod, so that
    /// a parent that dies before its runner pod exists leaves nothing behind.
    pub(crate) fn secret(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        key: &str,
        value: &str,
    ) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: self.base.metadata.namespace.clone(),
                labels: Some(labels),
                owner_references: Some(vec![self.owner.clone()]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            string_data: Some(BTreeMap::from([(key.into(), value.into())])),
            ..Secret::default()
        }
    }
}

/// Holds a runner pod's pool name as given (label values are cleaned).
pub(crate) const ANNOTATION_POOL: &str = "flame.pool-name";

/// The owner reference that ties a secret to its runner pod.
pub(crate) fn owned_by(pod: &Pod) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// `<parent>-<runner>-<tail>`: a DNS-1123 label (lowercase alphanumerics and `-`, at most 63,
/// alphanumeric at both ends), as a pod's name is also its hostname.
pub(crate) fn pod_name(parent: &str, runner_id: &str, tail: &str) -> String {
    let clean = |s: &str, max: usize| -> String {
        let cleaned: String = s
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(max)
            .collect();
        cleaned.trim_matches('-').to_string()
    };
    let parts = [clean(parent, 30), clean(runner_id, 24), clean(tail, 8)];
    let name = parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("-");
    let name = name.trim_matches('-');
    if name.is_empty() {
        "flame-runner".into()
    } else {
        name.into()
    }
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub(crate) fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parent() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "thumbs-7d9f-abcde", "namespace": "prod", "uid": "u-1",
                "labels": {"app": "thumbs", "pod-template-hash": "7d9f"}},
            "spec": {
                "serviceAccountName": "thumbs",
                "nodeSelector": {"pool": "general"},
                "initContainers": [{"name": "migrate", "image": "thumbs:1.2"}],
                "containers": [
                    {"name": "app", "image": "thumbs:1.2", "command": ["/app"], "args": ["serve"],
                     "env": [{"name": "DATABASE_URL", "value": "postgres://db"},
                             {"name": "FLAME_PARENT", "value": "stale"},
                             {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                     "ports": [{"containerPort": 8080}],
                     "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}},
                     "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
                                      {"name": "data", "mountPath": "/data"},
                                      {"name": "vault-token", "mountPath": "/var/run/vault"},
                                      {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]},
                    {"name": "sidecar", "image": "proxy:3",
                     "volumeMounts": [{"name": "proxy-certs", "mountPath": "/certs"}]}],
                "volumes": [{"name": "config", "configMap": {"name": "app-config"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                            {"name": "proxy-certs", "secret": {"secretName": "proxy-certs"}},
                            {"name": "vault-token", "projected": {"sources": [
                                {"serviceAccountToken": {"path": "token", "audience": "vault"}}]}},
                            {"name": "kube-api-access-x1", "projected": {"sources": []}}]},
            "status": {"containerStatuses": [{"name": "app", "image": "thumbs:1.2",
                "imageID": format!("registry.example.com/thumbs@sha256:{DIGEST}"),
                "ready": true, "restartCount": 0}]}
        }))
        .unwrap()
    }

    #[test]
    fn runner_pods_clone_the_app_container_pinned_and_without_what_serves() {
        let template =
            Template::new(&parent(), Some("app"), &Knobs::default(), "FLAME_PARENT").unwrap();
        let pod = template.pod(
            "thumbs-7d9f-abcde-thumbs-1-ab12",
            "thumbs",
            "thumbs-1",
            "FLAME_PARENT",
        );
        let value = serde_json::to_value(&pod).unwrap();
        let spec = &value["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert!(
            spec.get("enableServiceLinks").is_none(),
            "the parent's default stands"
        );
        assert_eq!(spec["serviceAccountName"], "thumbs");
        assert_eq!(spec["nodeSelector"], json!({"pool": "general"}));
        assert!(spec.get("initContainers").is_none());
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "the sidecar stays with the parent");
        let app = &containers[0];
        assert_eq!(
            app["image"],
            format!("thumbs@sha256:{DIGEST}"),
            "the spec's repository, at the digest the parent runs"
        );
        assert_eq!(app["imagePullPolicy"], "IfNotPresent");
        assert_eq!(app["args"], json!(["serve"]));
        assert!(app.get("readinessProbe").is_none() && app.get("ports").is_none());
        assert_eq!(
            app["volumeMounts"],
            json!([{"name": "config", "mountPath": "/etc/app"}])
        );
        assert_eq!(
            spec["volumes"],
            json!([{"name": "config", "configMap": {"name": "app-config"}}])
        );
        let env = app["env"].as_array().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["DATABASE_URL", "POD_IP", "FLAME_PARENT"]);
        assert_eq!(
            env[2]["valueFrom"],
            json!({"secretKeyRef": {"name": "thumbs-7d9f-abcde-thumbs-1-ab12", "key": "FLAME_PARENT"}})
        );
        let meta = &value["metadata"];
        assert_eq!(meta["namespace"], "prod");
        assert_eq!(
            meta["labels"],
            json!({"flame.parent": "u-1", "flame.pool": "thumbs", "flame.runner": "thumbs-1",
                   "app.kubernetes.io/managed-by": "flame-rt"})
        );
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Pod", "name": "thumbs-7d9f-abcde", "uid": "u-1", "controller": true}])
        );
    }

    #[test]
    fn a_pod_with_several_containers_needs_one_named() {
        let err = Template::new(&parent(), None, &Knobs::default(), "FLAME_PARENT")
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("app, sidecar"), "{err}");
        let err = Template::new(&parent(), Some("web"), &Knobs::default(), "FLAME_PARENT")
            .err()
            .unwrap();
        assert!(err.to_string().contains("no container \"web\""), "{err}");
    }

    #[test]
    fn the_hook_and_knobs_have_the_last_word() {
        let knobs = Knobs {
            env: BTreeMap::from([
                ("DATABASE_URL".into(), "postgres://replica".into()),
                ("PRICE".into(), "$(5) pa$$word".into()),
            ]),
            shared_volumes: vec!["data".into()],
            runtime_class: Some("nvidia".into()),
            hook: Some(Arc::new(|pod: &mut Pod| {
                pod.spec.as_mut().unwrap().priority_class_name = Some("batch".into());
                // A hook that replaces the labels and owners wholesale.
                pod.metadata.labels = Some(BTreeMap::from([("team".into(), "video".into())]));
                pod.metadata.owner_references = None;
                pod.metadata.name = Some("renamed".into());
            })),
            ..Knobs::default()
        };
        let template = Template::new(&parent(), Some("app"), &knobs, "FLAME_PARENT").unwrap();
        let pod = template.pod("p", "thumbs", "thumbs-1", "FLAME_PARENT");
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("video"));
        for key in [LABEL_PARENT, LABEL_MANAGED_BY, LABEL_POOL, LABEL_RUNNER] {
            assert!(labels.contains_key(key), "{key} is put back after the hook");
        }
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        let spec = pod.spec.unwrap();
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            volumes,
            ["config", "data"],
            "the shared claim is kept, a token only with API access"
        );
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(spec.priority_class_name.as_deref(), Some("batch"));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        let env = spec.containers[0].env.clone().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["DATABASE_URL", "POD_IP", "PRICE", "FLAME_PARENT"],
            "an override keeps its place"
        );
        assert_eq!(env[0].value.as_deref(), Some("postgres://replica"));
        assert_eq!(
            env[2].value.as_deref(),
            Some("$$(5) pa$$$$word"),
            "taken literally"
        );

        let with_api = Knobs {
            runner_api_access: true,
            ..Knobs::default()
        };
        let template = Template::new(&parent(), Some("app"), &with_api, "FLAME_PARENT").unwrap();
        let volumes: Vec<String> = template
            .pod("p", "thumbs", "thumbs-1", "FLAME_PARENT")
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(volumes, ["config", "vault-token"]);
    }

    #[test]
    fn a_pinned_image_keeps_the_specs_repository_and_a_preloaded_image_its_tag() {
        assert_eq!(
            without_tag("registry:5000/team/thumbs:1.2"),
            "registry:5000/team/thumbs"
        );
        assert_eq!(without_tag("registry:5000/thumbs"), "registry:5000/thumbs");
        assert_eq!(without_tag("thumbs"), "thumbs");
        let mut parent = parent();
        parent.spec.as_mut().unwrap().containers[0].image_pull_policy = Some("Never".into());
        let template =
            Template::new(&parent, Some("app"), &Knobs::default(), "FLAME_PARENT").unwrap();
        let app = &template
            .pod("p", "thumbs", "thumbs-1", "FLAME_PARENT")
            .spec
            .unwrap()
            .containers[0];
        assert_eq!(app.image_pull_policy.as_deref(), Some("Never"));
        assert_eq!(
            app.image,
            parent.spec.as_ref().unwrap().containers[0].image,
            "a node that never pulls may hold the image by its tag only"
        );
    }

    #[test]
    fn names_and_label_values_keep_to_kubernetes_alphabets() {
        assert_eq!(
            pod_name("Thumbs_App-7d9f", "thumbs/ü 3", "ab12"),
            "thumbs-app-7d9f-thumbs---3-ab12"
        );
        let long = pod_name(&"p".repeat(80), &"r".repeat(80), "ab12");
        assert!(long.len() <= 63, "{long}");
        assert_eq!(label_value("-thumbs/ü 3."), "thumbs___3");
        assert!(!is_digest_ref("docker-pullable://x@sha256:00"));
        assert!(is_digest_ref(&format!("x@sha256:{DIGEST}")));
    }
}
