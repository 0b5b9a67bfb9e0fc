//! The API through kube's typed client: every kind round-trips through k8s-openapi, selectors,
//! watches, RBAC, secrets, patches, strict validation and injected faults.

// The pod helpers go unused here: this file's pods need not run.
#[allow(dead_code)]
mod support;

use std::time::Duration;

use flame_k8s_emulator::{Emulator, Fault, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;
use support::bounded;

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(status) => *status,
        other => panic!("expected a Status error, got {other:?}"),
    }
}

async fn round_trip<K>(api: &Api<K>, object: serde_json::Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(object).unwrap();
    let name = object.meta().name.clone().unwrap();
    let created = api.create(&PostParams::default(), &object).await.unwrap();
    assert_eq!(created.meta().name.as_deref(), Some(name.as_str()));
    assert!(created.meta().uid.is_some());
    assert!(created.meta().creation_timestamp.is_some());
    let got = api.get(&name).await.unwrap();
    assert_eq!(got.meta().uid, created.meta().uid);
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|i| i.meta().name.as_deref() == Some(name.as_str()))
    );
    assert!(listed.metadata.resource_version.is_some());
    let patched = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"patched": "yes"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.meta().labels.as_ref().unwrap()["patched"], "yes");
    assert_ne!(
        patched.meta().resource_version,
        created.meta().resource_version
    );
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    // Pods go when their kubelet has stopped them; everything else at once.
    for _ in 0..100 {
        if api.get_opt(&name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} was not deleted");
}

#[tokio::test]
async fn every_kind_round_trips() {
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let client = emu.client("rt");
        round_trip(
            &Api::<ConfigMap>::namespaced(client.clone(), "rt"),
            json!({"metadata": {"name": "cm"}, "data": {"a": "b"}}),
        )
        .await;
        round_trip(
            &Api::<Secret>::namespaced(client.clone(), "rt"),
            json!({"metadata": {"name": "s"}, "type": "Opaque", "data": {"a": "Yg=="}}),
        )
        .await;
        round_trip(
            &Api::<ServiceAccount>::namespaced(client.clone(), "rt"),
            json!({"metadata": {"name": "sa"}, "automountServiceAccountToken": false}),
        )
        .await;
        round_trip(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": "ns1"}}),
        )
        .await;
        round_trip(
            &Api::<Deployment>::namespaced(client.clone(), "rt"),
            json!({
                "metadata": {"name": "d"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                         "template": {"metadata": {"labels": {"app": "d"}},
                                      "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}
            }),
        )
        .await;
        round_trip(
            &Api::<Role>::namespaced(client.clone(), "rt"),
            json!({
                "metadata": {"name": "r"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
            }),
        )
        .await;
        round_trip(
            &Api::<RoleBinding>::namespaced(client.clone(), "rt"),
            json!({
                "metadata": {"name": "rb"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "rt"}]
            }),
        )
        .await;
        round_trip(
            &Api::<Pod>::namespaced(client.clone(), "rt"),
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "flame-k8s-emu-absent:1"}]}
            }),
        )
        .await;

        // generateName, AlreadyExists, NotFound, Conflict on a stale update.
        let maps = Api::<ConfigMap>::namespaced(client.clone(), "rt");
        let generated: ConfigMap =
            serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap();
        let generated = maps
            .create(&PostParams::default(), &generated)
            .await
            .unwrap();
        let name = generated.metadata.name.clone().unwrap();
        assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
        let again: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let exists = api_error(
            maps.create(&PostParams::default(), &again)
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (exists.code, exists.reason.as_str()),
            (409, "AlreadyExists")
        );
        assert_eq!(
            exists.message,
            format!("configmaps \"{name}\" already exists")
        );
        let missing = api_error(maps.get("nope").await.unwrap_err());
        assert_eq!(
            (missing.code, missing.message.as_str()),
            (404, "configmaps \"nope\" not found")
        );
        assert!(maps.get_opt("nope").await.unwrap().is_none());
        maps.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "1"}})),
        )
        .await
        .unwrap();
        let stale = api_error(
            maps.replace(&name, &PostParams::default(), &generated)
                .await
                .unwrap_err(),
        );
        assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
        let precondition = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: Some("other".into()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let refused = api_error(maps.delete(&name, &precondition).await.unwrap_err());
        assert_eq!(refused.code, 409);
        assert!(
            refused
                .message
                .contains("Precondition failed: UID in precondition: other"),
            "{}",
            refused.message
        );
        let fresh = maps.get(&name).await.unwrap();
        let replaced = maps
            .replace(&name, &PostParams::default(), &fresh)
            .await
            .unwrap();
        assert_ne!(
            replaced.metadata.resource_version,
            fresh.metadata.resource_version
        );
        // The server's version.
        let version = client.apiserver_version().await.unwrap();
        assert_eq!(
            (version.major.as_str(), version.minor.as_str()),
            ("1", "33")
        );
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn selectors() {
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let maps = Api::<ConfigMap>::namespaced(emu.client("sel"), "sel");
        for (name, labels) in [
            ("a", json!({"app": "x", "tier": "web"})),
            ("b", json!({"app": "y"})),
            ("c", json!({})),
        ] {
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                    .unwrap();
            maps.create(&PostParams::default(), &cm).await.unwrap();
        }
        let other: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "a", "labels": {"app": "x"}}}))
                .unwrap();
        Api::<ConfigMap>::namespaced(emu.client("other"), "other")
            .create(&PostParams::default(), &other)
            .await
            .unwrap();
        let names = |selector: &'static str, fields: &'static str| {
            let maps = maps.clone();
            async move {
                let mut params = ListParams::default().labels(selector);
                if !fields.is_empty() {
                    params = params.fields(fields);
                }
                let mut names: Vec<String> = maps
                    .list(&params)
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .map(|m| m.metadata.name.unwrap())
                    .collect();
                names.sort();
                names.join(",")
            }
        };
        assert_eq!(names("app=x", "").await, "a");
        assert_eq!(names("app==x", "").await, "a");
        assert_eq!(names("app!=x", "").await, "b,c");
        assert_eq!(names("app", "").await, "a,b");
        assert_eq!(names("!app", "").await, "c");
        assert_eq!(names("app in (x, y)", "").await, "a,b");
        assert_eq!(names("app notin (x)", "").await, "b,c");
        assert_eq!(names("app=x,tier=web", "").await, "a");
        assert_eq!(names("", "metadata.name=b").await, "b");
        assert_eq!(names("", "metadata.name!=b").await, "a,c");
        // All namespaces.
        let everywhere = Api::<ConfigMap>::all(emu.client("sel"));
        let found = everywhere
            .list(&ListParams::default().labels("app=x"))
            .await
            .unwrap();
        let mut places: Vec<String> = found
            .items
            .iter()
            .map(|m| m.metadata.namespace.clone().unwrap())
            .collect();
        places.sort();
        assert_eq!(places, ["other", "sel"]);
        let by_ns = everywhere
            .list(&ListParams::default().fields("metadata.namespace=other"))
            .await
            .unwrap();
        assert_eq!(by_ns.items.len(), 1);
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn watch_sees_changes_in_order_and_expires() {
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let maps = Api::<ConfigMap>::namespaced(emu.client("w"), "w");
        let start = maps
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let stream = maps
            .watch(
                &WatchParams::default().fields("metadata.name=x").timeout(30),
                &start,
            )
            .await
            .unwrap();
        let mut stream = stream.boxed();
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        let first_rv = maps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let ignored: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "y"}})).unwrap();
        maps.create(&PostParams::default(), &ignored).await.unwrap();
        maps.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v"}})),
        )
        .await
        .unwrap();
        maps.delete("x", &DeleteParams::default()).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match stream
                .try_next()
                .await
                .unwrap()
                .expect("the watch ended early")
            {
                WatchEvent::Added(m) => seen.push(format!("ADDED {}", m.metadata.name.unwrap())),
                WatchEvent::Modified(m) => seen.push(format!("MODIFIED {}", m.data.unwrap()["k"])),
                WatchEvent::Deleted(m) => {
                    seen.push(format!("DELETED {}", m.metadata.name.unwrap()))
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
            }
        }
        assert_eq!(seen, ["ADDED x", "MODIFIED v", "DELETED x"]);

        // "0": the current objects first, as ADDED.
        let mut initial = maps
            .watch(&WatchParams::default().timeout(5), "0")
            .await
            .unwrap()
            .boxed();
        match initial.try_next().await.unwrap() {
            Some(WatchEvent::Added(m)) => assert_eq!(m.metadata.name.as_deref(), Some("y")),
            other => panic!("expected ADDED y, got {other:?}"),
        }

        // timeoutSeconds ends the stream.
        let mut short = maps
            .watch(&WatchParams::default().timeout(1), &first_rv)
            .await
            .unwrap()
            .boxed();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while short.try_next().await.unwrap().is_some() {}
        });
        ended.await.expect("the watch outlived its timeoutSeconds");

        // More than the event log holds: the first resourceVersion is gone.
        for i in 0..1001 {
            maps.patch(
                "y",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"i": i.to_string()}})),
            )
            .await
            .unwrap();
        }
        let mut old = maps
            .watch(&WatchParams::default().timeout(5), &first_rv)
            .await
            .unwrap()
            .boxed();
        match old.try_next().await.unwrap() {
            Some(WatchEvent::Error(e)) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                assert!(
                    e.message.starts_with("too old resource version: "),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected a 410, got {other:?}"),
        }
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn rbac_and_tokens() {
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let admin = emu.client("ns");
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                      {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
        })).unwrap();
        Api::<Role>::namespaced(admin.clone(), "ns").create(&PostParams::default(), &role).await.unwrap();
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "app"},
            "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": "ns"}]
        })).unwrap();
        Api::<RoleBinding>::namespaced(admin.clone(), "ns").create(&PostParams::default(), &binding).await.unwrap();

        let token = emu.service_account_token("ns", "app");
        assert_eq!(token, emu.service_account_token("ns", "app"));
        let app = emu.client_with_token("ns", &token);
        let pods = Api::<Pod>::namespaced(app.clone(), "ns");
        assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}
        })).unwrap();
        let denied = api_error(pods.create(&PostParams::default(), &pod).await.unwrap_err());
        assert_eq!((denied.code, denied.reason.as_str()), (403, "Forbidden"));
        assert_eq!(
            denied.message,
            "pods is forbidden: User \"system:serviceaccount:ns:app\" cannot create resource \"pods\" in API group \"\" in the namespace \"ns\""
        );
        let named = api_error(pods.delete("x", &DeleteParams::default()).await.unwrap_err());
        assert_eq!(
            named.message,
            "pods \"x\" is forbidden: User \"system:serviceaccount:ns:app\" cannot delete resource \"pods\" in API group \"\" in the namespace \"ns\""
        );
        // The binding is per namespace.
        let elsewhere = api_error(Api::<Pod>::namespaced(app.clone(), "other").list(&ListParams::default()).await.unwrap_err());
        assert_eq!(elsewhere.code, 403);
        // Discovery is open to any authenticated caller.
        app.apiserver_version().await.unwrap();
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}})).unwrap();
        Api::<Secret>::namespaced(app.clone(), "ns").create(&PostParams::default(), &secret).await.unwrap();
        let unreadable = api_error(Api::<Secret>::namespaced(app, "ns").get("s").await.unwrap_err());
        assert_eq!(unreadable.code, 403);

        // No token, or a wrong one.
        let mut config = kube::Config::new(emu.url().parse().unwrap());
        config.default_retry = false;
        let anonymous = kube::Client::try_from(config).unwrap();
        let refused = api_error(Api::<Pod>::namespaced(anonymous.clone(), "ns").list(&ListParams::default()).await.unwrap_err());
        assert_eq!((refused.code, refused.reason.as_str(), refused.message.as_str()), (401, "Unauthorized", "Unauthorized"));
        // /version is public, as in a real cluster.
        anonymous.apiserver_version().await.unwrap();
        let wrong = emu.client_with_token("ns", "not-a-token");
        assert_eq!(api_error(Api::<Pod>::namespaced(wrong, "ns").list(&ListParams::default()).await.unwrap_err()).code, 401);
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn secrets_patches_validation_and_faults() {
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let client = emu.client("s");
        let secrets = Api::<Secret>::namespaced(client.clone(), "s");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "tok"}, "type": "Opaque", "stringData": {"FLAME_PARENT": "hello"}
        })).unwrap();
        let created = secrets.create(&PostParams::default(), &secret).await.unwrap();
        assert!(created.string_data.is_none());
        let got = secrets.get("tok").await.unwrap();
        assert!(got.string_data.is_none());
        assert_eq!(got.data.unwrap()["FLAME_PARENT"].0, b"hello");
        let raw: serde_json::Value = client
            .request(http::Request::get("/api/v1/namespaces/s/secrets/tok").body(Vec::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(raw["data"]["FLAME_PARENT"], "aGVsbG8=");

        // Strategic merge: lists of containers merge by name; directives are dropped. (In a
        // namespace of its own: its controller's pods come and go, and each removal collects the
        // dangling owner references made below.)
        let deployments = Api::<Deployment>::namespaced(client.clone(), "s-apps");
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "d"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                     "template": {"metadata": {"labels": {"app": "d"}},
                                  "spec": {"containers": [{"name": "app", "image": "app:1", "args": ["a"]},
                                                          {"name": "side", "image": "side:1"}]}}}
        })).unwrap();
        deployments.create(&PostParams::default(), &deployment).await.unwrap();
        let patched = deployments.patch("d", &PatchParams::default(), &Patch::Strategic(json!({
            "spec": {"replicas": 2, "template": {"spec": {
                "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
                "containers": [{"name": "app", "image": "app:2"}, {"name": "side", "$patch": "delete"}]}}}
        }))).await.unwrap();
        let spec = patched.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let containers = spec.template.spec.unwrap().containers;
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0].image.as_deref(), Some("app:2"));
        assert_eq!(containers[0].args.as_deref(), Some(&["a".to_string()][..]));

        // Owner references merge by uid; a merge patch replaces the list.
        let maps = Api::<ConfigMap>::namespaced(client.clone(), "s");
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
        let owner = |uid: &str| json!({"apiVersion": "v1", "kind": "Pod", "name": uid, "uid": uid});
        maps.patch("c", &PatchParams::default(), &Patch::Strategic(json!({"metadata": {"ownerReferences": [owner("u1")]}}))).await.unwrap();
        let both = maps.patch("c", &PatchParams::default(), &Patch::Strategic(json!({"metadata": {"ownerReferences": [owner("u2")]}}))).await.unwrap();
        assert_eq!(both.metadata.owner_references.unwrap().len(), 2);
        let one = maps.patch("c", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"ownerReferences": [owner("u3")]}}))).await.unwrap();
        assert_eq!(one.metadata.owner_references.unwrap()[0].uid, "u3");
        let request = http::Request::patch("/api/v1/namespaces/s/configmaps/c")
            .header("content-type", "application/json-patch+json")
            .body(b"[]".to_vec())
            .unwrap();
        let unsupported = api_error(client.request::<serde_json::Value>(request).await.unwrap_err());
        assert_eq!(unsupported.code, 415);

        // fieldValidation=Strict: a field k8s-openapi does not know is refused.
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "strict"}, "spec": {"foo": 1}});
        let request = http::Request::post("/api/v1/namespaces/s/configmaps?fieldValidation=Strict")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap();
        let strict = api_error(client.request::<serde_json::Value>(request).await.unwrap_err());
        assert_eq!((strict.code, strict.reason.as_str()), (400, "BadRequest"));
        assert!(strict.message.ends_with("strict decoding error: unknown field \"spec\""), "{}", strict.message);
        let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "strict"},
                          "spec": {"foo": 1, "containers": [{"name": "c", "image": "i", "bar": 2}]}});
        let request = http::Request::post("/api/v1/namespaces/s/pods?fieldValidation=Strict")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap();
        let strict = api_error(client.request::<serde_json::Value>(request).await.unwrap_err());
        assert_eq!(
            strict.message,
            "Pod in version \"v1\" cannot be handled as a Pod: strict decoding error: unknown field \"spec.containers[0].bar\", unknown field \"spec.foo\""
        );
        let invalid = api_error(Api::<Pod>::namespaced(client.clone(), "s").create(&PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}})).unwrap()).await.unwrap_err());
        assert_eq!((invalid.code, invalid.message.as_str()), (422, "Pod \"p\" is invalid: spec.containers[0].image: Required value"));

        // Faults: the next N matching requests.
        emu.inject(Fault::Status {
            verb: "create", resource: "pods", code: 403, reason: "Forbidden".into(),
            message: "pods \"x\" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4".into(),
            times: 1, retry_after: None,
        });
        emu.inject(Fault::Status {
            verb: "list", resource: "configmaps", code: 429, reason: "TooManyRequests".into(),
            message: "Too many requests, please try again later.".into(), times: 2, retry_after: Some(1),
        });
        let pods = Api::<Pod>::namespaced(client.clone(), "s");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "flame-k8s-emu-absent:1"}]}})).unwrap();
        let quota = api_error(pods.create(&PostParams::default(), &pod).await.unwrap_err());
        assert_eq!((quota.code, quota.message.as_str()), (403, "pods \"x\" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4"));
        for _ in 0..2 {
            let throttled = api_error(maps.list(&ListParams::default()).await.unwrap_err());
            assert_eq!((throttled.code, throttled.reason.as_str()), (429, "TooManyRequests"));
            assert_eq!(throttled.details.unwrap().retry_after_seconds, 1);
        }
        maps.list(&ListParams::default()).await.unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let request = http::Request::get("/api/v1/namespaces/s/nothing").body(Vec::new()).unwrap();
        let nowhere = api_error(client.request::<serde_json::Value>(request).await.unwrap_err());
        assert_eq!((nowhere.code, nowhere.message.as_str()), (404, "the server could not find the requested resource"));
    })
    .await;
    emu.shutdown().await;
}
