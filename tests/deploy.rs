//! The Kubernetes manifests in `deploy/k8s`, checked offline for what a schema cannot
//! see: that the pieces agree with each other and with the node they run.
//!
//! - **Schemas**: `kubernetes-validate --strict` (PyPI, pip-installed into the cargo
//!   target dir on first run, like the API test's grpcio-tools) over the rendered base
//!   and overlays and the standalone manifests. The CRDs it has no schema for
//!   (ScaledObject, TriggerAuthentication, PodMonitor) are named here and checked by
//!   hand below instead. With `CI=true` a validator or kustomize that cannot be had
//!   fails the test; elsewhere the test says it did nothing.
//! - **Rendering**: `kustomize build` or `kubectl kustomize` renders each
//!   kustomization; every check below runs on what would be applied.
//! - **Agreement**: selectors match the pod labels; every port (container, probe,
//!   Service target, NetworkPolicy, scrape config, PodMonitor) is the one in the
//!   node's configured addresses; every `WARDEN_*` variable is a real
//!   `warden::HostFlags` argument and the whole environment parses and validates as
//!   the node's flags; the grace period covers preStop and the node's shutdown
//!   budget; probe paths exist on the real admin router; the autoscalers' maximum
//!   fits the stated database connection budget; the HPA's metric is the one the
//!   prometheus-adapter rule serves; the KEDA query counts correctly on seeded jobs in
//!   PostgreSQL.

use clap::{Args, FromArgMatches};
use serde_json::{json, Map, Value as J};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use warden_runtime::store::{self, AdminStore, PgAdminStore, PgStore, Store};
use warden_runtime::{Client, Lane, NewJob, PartitionCount};
use warden_tests::TestDb;
use yaml_rust2::{Yaml, YamlLoader};

/// The kustomizations rendered and checked.
const BUILDS: [&str; 3] = ["base", "overlays/production", "overlays/keda"];

/// Manifests applied on their own (not part of a kustomization).
const STANDALONE: [&str; 3] =
    ["examples/secret.example.yaml", "examples/secret-keda.example.yaml", "monitoring/podmonitor.yaml"];

/// Kinds kubernetes-validate has no schema for: checked by the tests below instead.
const CRD_KINDS: [&str; 3] = ["ScaledObject", "TriggerAuthentication", "PodMonitor"];

/// Pinned like the API test's grpcio-tools.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Kubernetes versions validated against: the oldest the manifests support (the
/// preStop `sleep` action is on by default from 1.30) and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// `WARDEN_*` variables the manifests set for flags being added on other branches:
/// passed over (with a note) until the flag exists, checked like the others after.
const PENDING_FLAGS: [(&str, &str); 0] = [];

/// The grace period must exceed preStop + shutdown budget by at least this much: the
/// process still stops gRPC and admin after the budget, and a slow database stretches
/// the release statement.
const GRACE_MARGIN: Duration = Duration::from_secs(5);

/// The retention pruner's own pool (`warden_runtime::retention::Retention::own_pool`).
const RETENTION_POOL_CONNECTIONS: u32 = 1;

/// Values the downward API would give one pod.
const POD_NAME: &str = "warden-5d8f7b9c6-x2k4q";
const POD_TEMPLATE_HASH: &str = "5d8f7b9c6";
const POD_NAMESPACE: &str = "warden";
const POD_IP: &str = "10.1.2.3";

// ----- loading -----------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn yaml_to_json(y: &Yaml) -> J {
    match y {
        Yaml::Null => J::Null,
        Yaml::Boolean(b) => J::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(s) => json!(s.parse::<f64>().unwrap_or_else(|_| panic!("bad YAML number {s}"))),
        Yaml::String(s) => J::String(s.clone()),
        Yaml::Array(a) => J::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => J::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("unsupported YAML key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect::<Map<_, _>>(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("unsupported YAML value {y:?}"),
    }
}

/// Every non-empty document of a (multi-document) YAML text.
fn parse_docs(text: &str, origin: &str) -> Vec<J> {
    YamlLoader::load_from_str(text)
        .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"))
        .iter()
        .map(yaml_to_json)
        .filter(|d| !d.is_null())
        .collect()
}

fn load(rel: &str) -> Vec<J> {
    let path = k8s_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_docs(&text, rel)
}

fn load_one(rel: &str) -> J {
    let mut docs = load(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document expected");
    docs.remove(0)
}

/// The command that renders a kustomization directory: `kustomize build` or
/// `kubectl kustomize` (kubectl has kustomize built in). `None` if neither runs.
fn kustomize_command() -> Option<Vec<&'static str>> {
    let runs = |cmd: &str, args: &[&str]| Command::new(cmd).args(args).output().is_ok_and(|o| o.status.success());
    if runs("kustomize", &["version"]) {
        Some(vec!["kustomize", "build"])
    } else if runs("kubectl", &["kustomize", "--help"]) {
        Some(vec!["kubectl", "kustomize"])
    } else {
        None
    }
}

/// One rendered kustomization.
struct Build {
    name: &'static str,
    yaml: String,
    docs: Vec<J>,
}

/// Every kustomization in [`BUILDS`], rendered. `None` (after saying so) when no
/// kustomize can be run outside CI; in CI that fails the test.
fn builds() -> Option<Vec<Build>> {
    let Some(cmd) = kustomize_command() else {
        assert!(
            !in_ci(),
            "CI=true but neither `kustomize` nor `kubectl kustomize` runs: the Kubernetes manifests cannot be rendered"
        );
        eprintln!("deploy: neither `kustomize` nor `kubectl` is installed: this test did nothing");
        return None;
    };
    Some(
        BUILDS
            .iter()
            .map(|name| {
                let out = Command::new(cmd[0])
                    .args(&cmd[1..])
                    .arg(k8s_dir().join(name))
                    .output()
                    .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
                assert!(out.status.success(), "{cmd:?} {name} failed: {}", String::from_utf8_lossy(&out.stderr));
                let yaml = String::from_utf8(out.stdout).unwrap();
                let docs = parse_docs(&yaml, name);
                assert!(!docs.is_empty(), "{name} rendered nothing");
                Build { name, yaml, docs }
            })
            .collect(),
    )
}

// ----- navigating manifests ----------------------------------------------------------

fn kind(d: &J) -> &str {
    d["kind"].as_str().unwrap_or_default()
}

fn name(d: &J) -> &str {
    d["metadata"]["name"].as_str().unwrap_or_default()
}

fn all_of<'a>(docs: &'a [J], k: &str) -> Vec<&'a J> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn the<'a>(docs: &'a [J], k: &str) -> &'a J {
    let found = all_of(docs, k);
    assert_eq!(found.len(), 1, "one {k} expected, found {}", found.len());
    found[0]
}

fn find<'a>(docs: &'a [J], k: &str, n: &str) -> &'a J {
    docs.iter().find(|d| kind(d) == k && name(d) == n).unwrap_or_else(|| panic!("no {k}/{n}"))
}

fn arr(v: &J) -> &[J] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn obj(v: &J) -> &Map<String, J> {
    static EMPTY: std::sync::OnceLock<Map<String, J>> = std::sync::OnceLock::new();
    v.as_object().unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

fn int(v: &J, what: &str) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("{what}: integer expected, got {v}"))
}

/// The Warden container of a Deployment.
fn container(deploy: &J) -> &J {
    let cs = arr(&deploy["spec"]["template"]["spec"]["containers"]);
    cs.iter().find(|c| c["name"] == "warden").expect("a container named warden")
}

fn pod_labels(deploy: &J) -> &J {
    &deploy["spec"]["template"]["metadata"]["labels"]
}

/// Does a label selector (`{matchLabels: …}`, or a Service's plain map) select these
/// labels? The manifests use matchLabels only: matchExpressions are refused so the
/// check can never pass by ignoring them.
fn selects(selector: &J, labels: &J, what: &str) -> bool {
    assert!(selector.get("matchExpressions").is_none(), "{what}: matchExpressions are not checked here");
    let wanted = selector.get("matchLabels").unwrap_or(selector);
    assert!(!obj(wanted).is_empty(), "{what}: empty selector (selects everything)");
    obj(wanted).iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A container port named or numbered `port`: (number, protocol).
fn container_port(c: &J, port: &J, what: &str) -> (i64, String) {
    let p = arr(&c["ports"])
        .iter()
        .find(|p| match port {
            J::String(n) => p["name"] == *n,
            J::Number(_) => p["containerPort"] == *port,
            _ => false,
        })
        .unwrap_or_else(|| panic!("{what}: port {port} is not a container port"));
    (int(&p["containerPort"], what), p["protocol"].as_str().unwrap_or("TCP").to_string())
}

/// The container's environment as the kubelet would set it for one pod: downward API
/// values of [`POD_NAME`] etc., secrets from the example Secret, `$(VAR)` references
/// expanded (and required to name a variable defined earlier, as Kubernetes does).
fn pod_env(c: &J) -> Vec<(String, String)> {
    let secrets = load_one("examples/secret.example.yaml");
    let mut env: Vec<(String, String)> = Vec::new();
    for e in arr(&c["env"]) {
        let n = e["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = e.get("value") {
            let mut v = v.as_str().unwrap_or_else(|| panic!("env {n}: value must be a string")).to_string();
            while let Some(start) = v.find("$(") {
                let end = start + v[start..].find(')').unwrap_or_else(|| panic!("env {n}: unclosed $("));
                let var = &v[start + 2..end];
                let val = env
                    .iter()
                    .find(|(k, _)| k == var)
                    .unwrap_or_else(|| panic!("env {n} refers to $({var}), which is not defined before it"))
                    .1
                    .clone();
                v.replace_range(start..=end, &val);
            }
            v
        } else if let Some(f) = e["valueFrom"].get("fieldRef") {
            match f["fieldPath"].as_str().unwrap() {
                "metadata.name" => POD_NAME.into(),
                "metadata.namespace" => POD_NAMESPACE.into(),
                "status.podIP" => POD_IP.into(),
                "metadata.labels['pod-template-hash']" => POD_TEMPLATE_HASH.into(),
                other => panic!("env {n}: fieldRef {other} not modelled here"),
            }
        } else if let Some(s) = e["valueFrom"].get("secretKeyRef") {
            assert_eq!(s["name"], secrets["metadata"]["name"], "env {n}: not the example Secret");
            let key = s["key"].as_str().unwrap();
            secrets["stringData"][key]
                .as_str()
                .unwrap_or_else(|| panic!("env {n}: key {key} missing from examples/secret.example.yaml"))
                .to_string()
        } else {
            panic!("env {n}: unsupported source {e}")
        };
        env.push((n, value));
    }
    env
}

fn env_get<'a>(env: &'a [(String, String)], n: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
}

/// Env name → long flag of every `warden::HostFlags` argument.
fn host_flag_envs() -> BTreeMap<String, String> {
    warden::HostFlags::augment_args(clap::Command::new("warden-node"))
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.get_long()?.to_string())))
        .collect()
}

/// The node's flags as this environment sets them: each variable becomes its flag on
/// a command line, parsed by the node's own clap definition with environment lookup
/// switched off (so the test process's own variables, `DATABASE_URL` included, are
/// not mixed in). Unknown `WARDEN_*` variables fail unless pending.
fn host_flags(env: &[(String, String)]) -> warden::HostFlags {
    let flags = host_flag_envs();
    let mut argv = vec!["warden-node".to_string()];
    for (k, v) in env {
        if let Some(long) = flags.get(k) {
            argv.push(format!("--{long}={v}"));
        } else if let Some((_, why)) = PENDING_FLAGS.iter().find(|(p, _)| p == k) {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("deploy: {k} is not a HostFlags argument yet (pending: {why}); passed over"));
        } else {
            assert!(
                !k.starts_with("WARDEN_"),
                "{k} is set in the manifests but no warden::HostFlags argument reads it"
            );
        }
    }
    let cmd = warden::HostFlags::augment_args(clap::Command::new("warden-node")).mut_args(|a| a.env(None::<&str>));
    let m = cmd.try_get_matches_from(&argv).unwrap_or_else(|e| panic!("the manifests' env as flags {argv:?}: {e}"));
    warden::HostFlags::from_arg_matches(&m).unwrap()
}

fn addr_port(v: &str, what: &str) -> i64 {
    let (_, port) = v.rsplit_once(':').unwrap_or_else(|| panic!("{what}={v}: no port"));
    port.parse().unwrap_or_else(|_| panic!("{what}={v}: bad port"))
}

/// Database connections one node opens at most, from its flags.
fn connections_per_node(f: &warden::HostFlags) -> u32 {
    let api = if f.grpc_listen.is_some() { f.api_max_connections } else { 0 };
    f.max_connections
        + f.enqueue_max_connections
        + api
        + warden_runtime::node::CONTROL_POOL_CONNECTIONS
        + RETENTION_POOL_CONNECTIONS
}

// ----- schemas -----------------------------------------------------------------------

/// `python3 -m kubernetes_validate` with the package on PYTHONPATH.
fn validator(deps: &Path) -> Command {
    let mut c = Command::new("python3");
    c.args(["-m", "kubernetes_validate"]).env("PYTHONPATH", deps);
    c
}

/// Where kubernetes-validate is installed (into the target dir, on first use). `None`
/// (after saying so) if it cannot be had outside CI; in CI that fails the test.
fn kubernetes_validate() -> Option<PathBuf> {
    let deps = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps-kubernetes-validate");
    let works = || validator(&deps).arg("--version").output().is_ok_and(|o| o.status.success());
    if !works() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&deps)
            .arg(KUBERNETES_VALIDATE)
            .output();
        let failure = match &out {
            Err(e) => Some(format!("python3 -m pip did not run: {e}")),
            Ok(o) if !o.status.success() => Some(String::from_utf8_lossy(&o.stderr).into_owned()),
            Ok(_) => None,
        };
        if let Some(why) = failure {
            assert!(!in_ci(), "CI=true and installing {KUBERNETES_VALIDATE} failed: {why}");
            eprintln!("deploy: {KUBERNETES_VALIDATE} could not be installed ({why}): schema validation did nothing");
            return None;
        }
        assert!(works(), "{KUBERNETES_VALIDATE} installed into {} but does not run", deps.display());
    }
    Some(deps)
}

/// Run the validator on one file for every version; every resource must pass, except
/// CRD kinds, which must be reported as having no schema (and nothing else may be).
fn validate_file(deps: &Path, file: &Path, docs: &[J]) -> Result<(), String> {
    for version in KUBERNETES_VERSIONS {
        let out = validator(deps)
            .args(["--strict", "-k", version])
            .arg(file)
            .output()
            .map_err(|e| format!("validator: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = format!("{} (k8s {version}):\n{stdout}{}", file.display(), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(report);
        }
        for d in docs {
            let (k, n) = (kind(d), name(d));
            let passed = format!("passed for resource {}/{n} ", k.to_lowercase());
            let no_schema = format!("Couldn't find schema for kind {k} ");
            let ok = if CRD_KINDS.contains(&k) {
                stdout.lines().any(|l| l.starts_with("WARN") && l.contains(&no_schema))
            } else {
                stdout.lines().any(|l| l.starts_with("INFO") && l.contains(&passed))
            };
            if !ok {
                return Err(format!(
                    "{k}/{n} not reported as {}: {report}",
                    if CRD_KINDS.contains(&k) { "a CRD" } else { "passed" }
                ));
            }
        }
        let others: Vec<&str> =
            stdout.lines().filter(|l| !(l.starts_with("INFO") && l.contains(" passed for resource "))).collect();
        let unexpected: Vec<&&str> =
            others.iter().filter(|l| !CRD_KINDS.iter().any(|k| l.contains(&format!("for kind {k} ")))).collect();
        if !unexpected.is_empty() {
            return Err(format!("unexpected validator output {unexpected:?}: {report}"));
        }
    }
    Ok(())
}

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    let Some(builds) = builds() else { return };
    let Some(deps) = kubernetes_validate() else { return };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s-rendered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // The validator must really be strict: a field no schema has fails.
    let bogus = dir.join("bogus.yaml");
    let bogus_yaml =
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: 1}]\n  publishNotReady: true\n";
    std::fs::write(&bogus, bogus_yaml).unwrap();
    assert!(
        validate_file(&deps, &bogus, &parse_docs(bogus_yaml, "bogus")).is_err(),
        "kubernetes-validate --strict accepted an unknown field: it would check nothing"
    );

    let mut checked = 0;
    for b in &builds {
        let file = dir.join(format!("{}.yaml", b.name.replace('/', "-")));
        std::fs::write(&file, &b.yaml).unwrap();
        validate_file(&deps, &file, &b.docs).unwrap_or_else(|e| panic!("{}: {e}", b.name));
        checked += b.docs.len();
    }
    for rel in STANDALONE {
        validate_file(&deps, &k8s_dir().join(rel), &load(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        checked += load(rel).len();
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("deploy: {checked} resources validated (--strict, Kubernetes {KUBERNETES_VERSIONS:?})");
}

// ----- agreement ---------------------------------------------------------------------

#[test]
fn every_selector_and_target_matches_the_warden_pods() {
    let Some(builds) = builds() else { return };
    for b in &builds {
        let docs = &b.docs;
        let deploy = the(docs, "Deployment");
        let labels = pod_labels(deploy);
        let at = |what: &str| format!("{}: {what}", b.name);
        assert!(selects(&deploy["spec"]["selector"], labels, &at("Deployment selector")));
        for s in all_of(docs, "Service") {
            assert!(selects(&s["spec"]["selector"], labels, &at(name(s))), "{}", at(&format!("Service {}", name(s))));
        }
        let pdb = the(docs, "PodDisruptionBudget");
        assert!(selects(&pdb["spec"]["selector"], labels, &at("PDB")), "{}", at("PDB selector"));
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{}", at("PDB maxUnavailable"));
        let np = the(docs, "NetworkPolicy");
        assert!(
            selects(&np["spec"]["podSelector"], labels, &at("NetworkPolicy")),
            "{}",
            at("NetworkPolicy podSelector")
        );
        for c in arr(&deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]) {
            assert!(selects(&c["labelSelector"], labels, &at("topology spread")), "{}", at("topology spread selector"));
        }
        for hpa in all_of(docs, "HorizontalPodAutoscaler") {
            let t = &hpa["spec"]["scaleTargetRef"];
            assert_eq!(
                (t["apiVersion"].as_str(), t["kind"].as_str()),
                (Some("apps/v1"), Some("Deployment")),
                "{}",
                at("HPA")
            );
            assert_eq!(t["name"].as_str(), Some(name(deploy)), "{}", at("HPA scaleTargetRef"));
        }
        for so in all_of(docs, "ScaledObject") {
            let t = &so["spec"]["scaleTargetRef"];
            assert!(t["kind"].is_null() || t["kind"] == "Deployment", "{}", at("ScaledObject kind"));
            assert_eq!(t["name"].as_str(), Some(name(deploy)), "{}", at("ScaledObject scaleTargetRef"));
        }
        // An autoscaler owns the replica count: a re-apply must not reset it.
        let autoscaled =
            !all_of(docs, "HorizontalPodAutoscaler").is_empty() || !all_of(docs, "ScaledObject").is_empty();
        assert_eq!(deploy["spec"].get("replicas").is_none(), autoscaled, "{}", at("spec.replicas iff not autoscaled"));
        assert!(
            all_of(docs, "HorizontalPodAutoscaler").is_empty() || all_of(docs, "ScaledObject").is_empty(),
            "{}",
            at("an HPA and a ScaledObject would fight over the Deployment")
        );
        // The ServiceAccount and Secret the pods use exist / are documented.
        let sa = deploy["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
        find(docs, "ServiceAccount", sa);
    }
    // The PodMonitor (applied on its own) selects the same pods.
    let base = &builds[0].docs;
    let pm = load_one("monitoring/podmonitor.yaml");
    assert!(selects(&pm["spec"]["selector"], pod_labels(the(base, "Deployment")), "PodMonitor"));
}

#[test]
fn every_port_is_the_one_the_node_listens_on() {
    let Some(builds) = builds() else { return };
    for b in &builds {
        let docs = &b.docs;
        let deploy = the(docs, "Deployment");
        let c = container(deploy);
        let env = pod_env(c);
        let at = |what: &str| format!("{}: {what}", b.name);
        let var = |n: &str| env_get(&env, n).unwrap_or_else(|| panic!("{}", at(&format!("{n} is not set"))));
        let admin = addr_port(var("WARDEN_ADMIN_ADDR"), "WARDEN_ADMIN_ADDR");
        let grpc = addr_port(var("WARDEN_GRPC_LISTEN"), "WARDEN_GRPC_LISTEN");
        let gossip = addr_port(var("WARDEN_GOSSIP_LISTEN"), "WARDEN_GOSSIP_LISTEN");
        // Announced addresses: this pod's IP and the same ports.
        assert_eq!(var("WARDEN_GOSSIP_ADVERTISE"), format!("{POD_IP}:{gossip}"), "{}", at("gossip advertise"));
        assert_eq!(var("WARDEN_GRPC_ADDR"), format!("{POD_IP}:{grpc}"), "{}", at("gRPC addr"));

        // Container ports by name, number and protocol.
        assert_eq!(container_port(c, &json!("admin"), "admin"), (admin, "TCP".into()), "{}", at("admin port"));
        assert_eq!(container_port(c, &json!("grpc"), "grpc"), (grpc, "TCP".into()), "{}", at("grpc port"));
        assert_eq!(container_port(c, &json!("gossip"), "gossip"), (gossip, "UDP".into()), "{}", at("gossip port"));
        assert_eq!(arr(&c["ports"]).len(), 3, "{}", at("exactly the three ports"));

        // Probes on the admin port.
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if let Some(p) = c.get(probe) {
                let (port, _) = container_port(c, &p["httpGet"]["port"], probe);
                assert_eq!(port, admin, "{}", at(&format!("{probe} port")));
            }
        }
        // Scrape annotations.
        let ann = &deploy["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true", "{}", at("prometheus.io/scrape"));
        assert_eq!(ann["prometheus.io/port"], admin.to_string(), "{}", at("prometheus.io/port"));

        // Services: targets resolve to the right container port and protocol.
        let headless = all_of(docs, "Service")
            .into_iter()
            .find(|s| s["spec"]["clusterIP"] == "None")
            .unwrap_or_else(|| panic!("{}", at("no headless Service")));
        assert_eq!(headless["spec"]["publishNotReadyAddresses"], true, "{}", at("headless publishNotReadyAddresses"));
        for s in all_of(docs, "Service") {
            for p in arr(&s["spec"]["ports"]) {
                let target = p.get("targetPort").unwrap_or(&p["port"]);
                let (port, proto) = container_port(c, target, &at(name(s)));
                assert_eq!(proto, p["protocol"].as_str().unwrap_or("TCP"), "{}", at(&format!("{} protocol", name(s))));
                assert!([grpc, gossip].contains(&port), "{}", at(&format!("{} exposes port {port}", name(s))));
            }
        }
        let gossip_svc = arr(&headless["spec"]["ports"]);
        assert_eq!(container_port(c, gossip_svc[0].get("targetPort").unwrap(), "gossip").0, gossip);
        // Seeds: the headless Service's DNS name in this namespace, on the gossip port.
        let seeds = var("WARDEN_SEEDS");
        assert_eq!(seeds, format!("{}.{POD_NAMESPACE}.svc:{gossip}", name(headless)), "{}", at("WARDEN_SEEDS"));

        // NetworkPolicy ports: gossip in and out between Warden pods (UDP), gRPC and
        // admin in; PostgreSQL and DNS out.
        let np = the(docs, "NetworkPolicy");
        let labels = pod_labels(deploy);
        let rule_ports = |rule: &J| -> Vec<(i64, String)> {
            arr(&rule["ports"])
                .iter()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                    match &p["port"] {
                        J::String(_) => container_port(c, &p["port"], "NetworkPolicy port"),
                        n => (int(n, "NetworkPolicy port"), proto),
                    }
                })
                .collect()
        };
        let from_warden = |rule: &J, key: &str| {
            arr(&rule[key]).iter().any(|peer| peer.get("podSelector").is_some_and(|s| selects(s, labels, "peer")))
        };
        let ingress = arr(&np["spec"]["ingress"]);
        let egress = arr(&np["spec"]["egress"]);
        assert!(
            ingress.iter().any(|r| from_warden(r, "from") && rule_ports(r) == vec![(gossip, "UDP".to_string())]),
            "{}",
            at("gossip ingress from Warden pods")
        );
        assert!(
            egress.iter().any(|r| from_warden(r, "to") && rule_ports(r) == vec![(gossip, "UDP".to_string())]),
            "{}",
            at("gossip egress to Warden pods")
        );
        let ports_in: BTreeSet<(i64, String)> = ingress.iter().flat_map(&rule_ports).collect();
        let expected: BTreeSet<(i64, String)> =
            [(gossip, "UDP".into()), (grpc, "TCP".into()), (admin, "TCP".into())].into();
        assert_eq!(ports_in, expected, "{}", at("NetworkPolicy ingress ports"));
        let grpc_rule = ingress.iter().find(|r| rule_ports(r) == vec![(grpc, "TCP".to_string())]).unwrap();
        assert!(!from_warden(grpc_rule, "from"), "{}", at("gRPC ingress is for labelled clients"));
        assert!(
            arr(&grpc_rule["from"])
                .iter()
                .all(|p| obj(&p["podSelector"]["matchLabels"]).contains_key("warden.dev/grpc-client")),
            "{}",
            at("gRPC ingress from pods labelled warden.dev/grpc-client")
        );
        let admin_rule = ingress.iter().find(|r| rule_ports(r) == vec![(admin, "TCP".to_string())]).unwrap();
        assert!(
            arr(&admin_rule["from"])
                .iter()
                .all(|p| p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"),
            "{}",
            at("admin ingress from the monitoring namespace only")
        );
        let ports_out: BTreeSet<(i64, String)> = egress.iter().flat_map(&rule_ports).collect();
        let expected: BTreeSet<(i64, String)> =
            [(53, "UDP".into()), (53, "TCP".into()), (gossip, "UDP".into()), (5432, "TCP".into())].into();
        assert_eq!(ports_out, expected, "{}", at("NetworkPolicy egress ports"));
        let db_rule = egress.iter().find(|r| rule_ports(r) == vec![(5432, "TCP".to_string())]).unwrap();
        let cidr = db_rule["to"][0]["ipBlock"]["cidr"].as_str().unwrap_or_else(|| panic!("{}", at("database ipBlock")));
        if b.name != "base" {
            assert_ne!(cidr, "192.0.2.0/24", "{}", at("the overlay must replace the base's placeholder database CIDR"));
        }
    }

    // Monitoring config (standalone files) against the base's admin port.
    let base = &builds[0].docs;
    let c = container(the(base, "Deployment"));
    let pm = load_one("monitoring/podmonitor.yaml");
    for ep in arr(&pm["spec"]["podMetricsEndpoints"]) {
        let (port, proto) = container_port(c, &ep["port"], "PodMonitor port");
        assert_eq!((port, proto.as_str()), (container_port(c, &json!("admin"), "admin").0, "TCP"), "PodMonitor port");
    }
    let scrape = load_one("monitoring/prometheus-scrape-config.yaml");
    let job = &scrape["scrape_configs"][0];
    let keep_port = arr(&job["relabel_configs"])
        .iter()
        .find(|r| r["source_labels"][0] == "__meta_kubernetes_pod_container_port_name")
        .expect("scrape config keeps one container port");
    container_port(c, &keep_port["regex"], "scrape config port name");
    assert_eq!(keep_port["regex"], "admin");
}

#[test]
fn every_warden_variable_is_a_host_flag_and_the_environment_is_a_valid_node_config() {
    let Some(builds) = builds() else { return };
    let flags = host_flag_envs();
    assert!(flags.contains_key("WARDEN_ADMIN_ADDR") && flags.contains_key("DATABASE_URL"), "introspection: {flags:?}");
    for (pending, _) in PENDING_FLAGS {
        if flags.contains_key(pending) {
            eprintln!("deploy: {pending} is a HostFlags argument now: remove it from PENDING_FLAGS");
        }
    }
    for b in &builds {
        let c = container(the(&b.docs, "Deployment"));
        let env = pod_env(c);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{}: an env variable is set twice: {names:?}", b.name);
        // host_flags fails on a WARDEN_* name that no flag reads.
        let f = host_flags(&env);
        // The whole node configuration validates (lease, drain, retention, …).
        f.node_config().unwrap_or_else(|e| panic!("{}: {e:#}", b.name));
        assert_eq!(f.node_id, POD_NAME, "{}: node id from the pod name", b.name);
        assert!(f.gossip_listen.is_some() && f.admin_addr.is_some() && f.grpc_listen.is_some(), "{}", b.name);
        assert!(f.api_token_file.is_some() && f.api_token.is_none(), "{}: API token from a mounted file", b.name);
        assert_eq!(f.max_concurrent_attempts, 32, "{}: 32 execution slots per node", b.name);
        // The node version comes from the pod-template-hash label (downward API).
        let version = arr(&c["env"]).iter().find(|e| e["name"] == "WARDEN_NODE_VERSION").expect("WARDEN_NODE_VERSION");
        assert_eq!(version["valueFrom"]["fieldRef"]["fieldPath"], "metadata.labels['pod-template-hash']");
    }
}

#[test]
fn secrets_are_mounted_files_and_the_examples_are_placeholders() {
    let Some(builds) = builds() else { return };
    let secret = load_one("examples/secret.example.yaml");
    for b in &builds {
        assert!(all_of(&b.docs, "Secret").is_empty(), "{}: no Secret is shipped in a kustomization", b.name);
        let deploy = the(&b.docs, "Deployment");
        let c = container(deploy);
        let env = pod_env(c); // every secretKeyRef key exists in the example Secret
        let volumes = arr(&deploy["spec"]["template"]["spec"]["volumes"]);
        for var in ["WARDEN_API_TOKEN_FILE", "WARDEN_GOSSIP_SECRET_FILE"] {
            let path = env_get(&env, var).unwrap_or_else(|| panic!("{}: {var} not set", b.name));
            let mount = arr(&c["volumeMounts"])
                .iter()
                .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
                .unwrap_or_else(|| panic!("{}: {var}={path} is on no volume mount", b.name));
            assert_eq!(mount["readOnly"], true, "{}: secret mounts are read-only", b.name);
            let rel = &path[mount["mountPath"].as_str().unwrap().len() + 1..];
            let vol = volumes.iter().find(|v| v["name"] == mount["name"]).expect("mounted volume");
            assert_eq!(vol["secret"]["secretName"], secret["metadata"]["name"], "{}: {var}", b.name);
            let item = arr(&vol["secret"]["items"])
                .iter()
                .find(|i| i["path"] == rel)
                .unwrap_or_else(|| panic!("{}: {var}: no secret item at {rel}", b.name));
            let key = item["key"].as_str().unwrap();
            assert!(secret["stringData"].get(key).is_some(), "{}: {var}: key {key} not in the example Secret", b.name);
            // 0440 with the pod's fsGroup: readable by the node (uid/gid 65532), nobody else.
            assert_eq!(vol["secret"]["defaultMode"], 0o440, "{}: secret file mode", b.name);
        }
    }
    for rel in ["examples/secret.example.yaml", "examples/secret-keda.example.yaml"] {
        let s = load_one(rel);
        for (k, v) in obj(&s["stringData"]) {
            assert!(v.as_str().unwrap().contains("REPLACE_ME"), "{rel}: {k} must be an obvious placeholder");
        }
    }
    let gossip = secret["stringData"]["gossip-secret"].as_str().unwrap();
    assert!(gossip.chars().count() >= warden::flags::MIN_GOSSIP_SECRET_CHARS, "example gossip secret too short");
    // KEDA's TriggerAuthentication reads a key the KEDA example Secret has.
    let keda_secret = load_one("examples/secret-keda.example.yaml");
    let ta = load_one("overlays/keda/triggerauthentication.yaml");
    for r in arr(&ta["spec"]["secretTargetRef"]) {
        assert_eq!(r["name"], keda_secret["metadata"]["name"]);
        assert!(keda_secret["stringData"].get(r["key"].as_str().unwrap()).is_some(), "{r}");
    }
}

#[test]
fn pods_run_locked_down() {
    let Some(builds) = builds() else { return };
    for b in &builds {
        let deploy = the(&b.docs, "Deployment");
        let pod = &deploy["spec"]["template"]["spec"];
        let c = container(deploy);
        let at = |w: &str| format!("{}: {w}", b.name);
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", at("pod token"));
        let sa = find(&b.docs, "ServiceAccount", pod["serviceAccountName"].as_str().unwrap());
        assert_eq!(sa["automountServiceAccountToken"], false, "{}", at("ServiceAccount token"));
        assert!(all_of(&b.docs, "Role").is_empty() && all_of(&b.docs, "RoleBinding").is_empty(), "{}", at("no RBAC"));
        assert_eq!(pod["enableServiceLinks"], false, "{}", at("service links would land in WARDEN_*"));
        for sc in [&pod["securityContext"], &c["securityContext"]] {
            assert_eq!(sc["runAsNonRoot"], true, "{}", at("runAsNonRoot"));
            assert_eq!(sc["runAsUser"], 65532, "{}", at("uid 65532"));
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{}", at("seccomp"));
        }
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", at("read-only root"));
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", at("no privilege escalation"));
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{}", at("drop ALL"));
        assert!(sc["capabilities"].get("add").is_none(), "{}", at("no capability added"));
        for r in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(c["resources"][r].get(res).is_some(), "{}", at(&format!("resources.{r}.{res}")));
            }
        }
        let s = &deploy["spec"]["strategy"];
        assert_eq!(s["type"], "RollingUpdate", "{}", at("strategy"));
        assert_eq!((&s["rollingUpdate"]["maxSurge"], &s["rollingUpdate"]["maxUnavailable"]), (&json!(1), &json!(0)));
    }
}

#[test]
fn the_grace_period_covers_prestop_and_the_shutdown_budget() {
    let Some(builds) = builds() else { return };
    for b in &builds {
        let deploy = the(&b.docs, "Deployment");
        let c = container(deploy);
        let f = host_flags(&pod_env(c));
        let budget = 2 * Duration::from_millis(f.settle_delay_ms)
            + Duration::from_millis(f.drain_timeout_ms)
            + warden_runtime::node::HANDOFF_RELEASE_BUDGET;
        let pre_stop = match c["lifecycle"].get("preStop") {
            None => Duration::ZERO,
            Some(p) => {
                Duration::from_secs(int(&p["sleep"]["seconds"], "preStop: only a sleep action is modelled here") as u64)
            }
        };
        let grace = Duration::from_secs(int(
            &deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            "terminationGracePeriodSeconds",
        ) as u64);
        assert!(
            grace >= pre_stop + budget + GRACE_MARGIN,
            "{}: terminationGracePeriodSeconds {grace:?} < preStop {pre_stop:?} + shutdown budget {budget:?} + margin {GRACE_MARGIN:?}",
            b.name
        );
        // The sleep is there so endpoints drop before SIGTERM; it must stay short of
        // what it delays (each pod of a rollout waits for it).
        assert!(pre_stop <= Duration::from_secs(10), "{}: preStop {pre_stop:?}", b.name);

        // Liveness on /healthz, readiness on /readyz, and liveness the more lenient.
        let p = |n: &str| &c[n];
        assert_eq!(p("livenessProbe")["httpGet"]["path"], "/healthz", "{}", b.name);
        assert_eq!(p("startupProbe")["httpGet"]["path"], "/healthz", "{}", b.name);
        assert_eq!(p("readinessProbe")["httpGet"]["path"], "/readyz", "{}", b.name);
        let tolerance =
            |probe: &J| int(&probe["periodSeconds"], "period") * int(&probe["failureThreshold"], "threshold");
        assert!(
            tolerance(p("livenessProbe")) > tolerance(p("readinessProbe")),
            "{}: liveness must tolerate longer than readiness",
            b.name
        );
    }
}

/// Every HTTP path the manifests point at (probes, scrape annotation, PodMonitor)
/// exists on the admin router: 200 or 503, never 404.
#[tokio::test]
async fn probe_and_scrape_paths_exist_on_the_admin_server() {
    let Some(builds) = builds() else { return };
    let mut paths = BTreeSet::new();
    for b in &builds {
        let deploy = the(&b.docs, "Deployment");
        let c = container(deploy);
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            paths.insert(c[probe]["httpGet"]["path"].as_str().unwrap().to_string());
        }
        paths.insert(
            deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"].as_str().unwrap().into(),
        );
    }
    for ep in arr(&load_one("monitoring/podmonitor.yaml")["spec"]["podMetricsEndpoints"]) {
        paths.insert(ep["path"].as_str().unwrap().into());
    }
    assert!(paths.len() >= 3, "{paths:?}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(warden::admin::serve(listener, warden::admin::Readiness::default(), None, stop.clone()));
    let get = |path: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: warden\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply.split_whitespace().nth(1).and_then(|code| code.parse::<u16>().ok()).expect("an HTTP status")
    };
    assert_eq!(get("/no-such-path".into()).await, 404, "the check must be able to see a missing path");
    for path in &paths {
        let status = get(path.clone()).await;
        assert!([200, 503].contains(&status), "{path}: HTTP {status}");
    }
    // A node that has not started is live but not ready.
    assert_eq!(get("/healthz".into()).await, 200);
    assert_eq!(get("/readyz".into()).await, 503);
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[test]
fn autoscaling_fits_the_database_connection_budget_and_uses_the_served_metric() {
    let Some(builds) = builds() else { return };
    let adapter = load_one("monitoring/prometheus-adapter-config.yaml");
    let scrape = load_one("monitoring/prometheus-scrape-config.yaml");
    let mut autoscalers = 0;
    for b in &builds {
        let deploy = the(&b.docs, "Deployment");
        let f = host_flags(&pod_env(container(deploy)));
        let per_node = connections_per_node(&f);
        let surge = int(&deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "maxSurge (a number)");
        let slots = f.max_concurrent_attempts as i64;
        let scalers: Vec<(&J, i64, i64)> = all_of(&b.docs, "HorizontalPodAutoscaler")
            .into_iter()
            .map(|h| (h, int(&h["spec"]["minReplicas"], "minReplicas"), int(&h["spec"]["maxReplicas"], "maxReplicas")))
            .chain(all_of(&b.docs, "ScaledObject").into_iter().map(|s| {
                (
                    s,
                    int(&s["spec"]["minReplicaCount"], "minReplicaCount"),
                    int(&s["spec"]["maxReplicaCount"], "maxReplicaCount"),
                )
            }))
            .collect();
        for (scaler, min, max) in scalers {
            autoscalers += 1;
            let at = format!("{}: {} {}", b.name, kind(scaler), name(scaler));
            assert!(1 <= min && min <= max, "{at}: replicas {min}..{max}");
            let budget: i64 = scaler["metadata"]["annotations"]["warden.dev/database-connection-budget"]
                .as_str()
                .unwrap_or_else(|| panic!("{at}: no warden.dev/database-connection-budget annotation"))
                .parse()
                .unwrap_or_else(|_| panic!("{at}: the budget is not a number"));
            let peak = (max + surge) * per_node as i64;
            assert!(
                peak <= budget,
                "{at}: (maxReplicas {max} + maxSurge {surge}) x {per_node} connections per node = {peak} > budget {budget}"
            );
            eprintln!("deploy: {at}: peak {peak} database connections <= budget {budget}");

            // Slow, stabilised scaling: every member change rebalances partitions.
            let behavior = if kind(scaler) == "ScaledObject" {
                &scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            } else {
                &scaler["spec"]["behavior"]
            };
            let window = |dir: &str| int(&behavior[dir]["stabilizationWindowSeconds"], "stabilizationWindowSeconds");
            assert!(window("scaleUp") >= 60 && window("scaleDown") >= 300, "{at}: stabilisation windows");
            for dir in ["scaleUp", "scaleDown"] {
                assert!(!arr(&behavior[dir]["policies"]).is_empty(), "{at}: {dir} policies");
            }
            assert_eq!(behavior["scaleDown"]["policies"][0]["value"], 1, "{at}: scale in one node at a time");

            if kind(scaler) == "HorizontalPodAutoscaler" {
                let metrics = arr(&scaler["spec"]["metrics"]);
                let pods: Vec<&J> = metrics.iter().filter(|m| m["type"] == "Pods").collect();
                assert_eq!(pods.len(), 1, "{at}: one Pods metric");
                let metric = pods[0]["pods"]["metric"]["name"].as_str().unwrap();
                assert_eq!(metric, "warden_saturation", "{at}");
                let target = pods[0]["pods"]["target"]["averageValue"].as_str().unwrap();
                assert!(
                    target.ends_with('m') && target[..target.len() - 1].parse::<u32>().is_ok_and(|m| m < 1000),
                    "{at}: saturation target {target} must be below 1 (in milli-units)"
                );
                assert!(
                    metrics.iter().any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu"),
                    "{at}: CPU too"
                );
                // The adapter serves that name, from series carrying the labels that
                // the scrape config sets.
                let rule = arr(&adapter["rules"])
                    .iter()
                    .find(|r| r["name"]["as"] == metric)
                    .unwrap_or_else(|| panic!("{at}: no prometheus-adapter rule serves {metric}"));
                let series = rule["seriesQuery"].as_str().unwrap();
                assert!(series.starts_with(&format!("{metric}{{")), "{at}: adapter seriesQuery {series}");
                assert!(
                    format!("^{metric}$") == rule["name"]["matches"].as_str().unwrap(),
                    "{at}: adapter name.matches"
                );
                for (label, resource) in [("namespace", "namespace"), ("pod", "pod")] {
                    assert_eq!(rule["resources"]["overrides"][label]["resource"], resource, "{at}: adapter {label}");
                    let meta = format!("__meta_kubernetes_{}", if label == "pod" { "pod_name" } else { "namespace" });
                    assert!(
                        arr(&scrape["scrape_configs"][0]["relabel_configs"])
                            .iter()
                            .any(|r| r["target_label"] == label && r["source_labels"] == json!([meta])),
                        "{at}: the scrape config does not set the `{label}` label the adapter maps"
                    );
                }
            } else {
                let triggers = arr(&scaler["spec"]["triggers"]);
                assert_eq!(triggers.len(), 1, "{at}: one trigger");
                let t = &triggers[0];
                assert_eq!(t["type"], "postgresql", "{at}");
                // KEDA's trigger metadata is a map of strings: a number fails its CRD.
                for (k, v) in obj(&t["metadata"]) {
                    assert!(v.is_string(), "{at}: trigger metadata {k} must be a string");
                }
                let target: i64 = t["metadata"]["targetQueryValue"].as_str().unwrap().parse().unwrap();
                assert!(0 < target && target <= slots, "{at}: target {target} accounts per node vs {slots} slots");
                let auth = t["authenticationRef"]["name"].as_str().unwrap();
                let ta = find(&b.docs, "TriggerAuthentication", auth);
                assert!(arr(&ta["spec"]["secretTargetRef"]).iter().any(|r| r["parameter"] == "connection"), "{at}");
            }
        }
    }
    assert_eq!(autoscalers, 2, "the production HPA and the KEDA ScaledObject");
}

/// The CRDs kubernetes-validate has no schema for: the fields used must be ones the
/// CRD has (a typo would otherwise be dropped by the API server, or refused at apply).
#[test]
fn crd_resources_use_only_known_fields() {
    let Some(builds) = builds() else { return };
    let known = |v: &J, allowed: &[&str], what: &str| {
        for k in obj(v).keys() {
            assert!(allowed.contains(&k.as_str()), "{what}: unknown field {k} (known: {allowed:?})");
        }
    };
    let meta = ["name", "namespace", "labels", "annotations"];
    let mut seen = BTreeSet::new();
    let mut docs: Vec<J> = builds.iter().flat_map(|b| b.docs.clone()).collect();
    docs.extend(load("monitoring/podmonitor.yaml"));
    for d in docs.iter().filter(|d| CRD_KINDS.contains(&kind(d))) {
        seen.insert(kind(d).to_string());
        known(d, &["apiVersion", "kind", "metadata", "spec"], kind(d));
        known(&d["metadata"], &meta, "metadata");
        match kind(d) {
            "ScaledObject" => {
                assert_eq!(d["apiVersion"], "keda.sh/v1alpha1");
                let spec = &d["spec"];
                known(
                    spec,
                    &[
                        "scaleTargetRef",
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                        "idleReplicaCount",
                        "minReplicaCount",
                        "maxReplicaCount",
                        "fallback",
                        "advanced",
                        "triggers",
                    ],
                    "ScaledObject.spec",
                );
                known(
                    &spec["scaleTargetRef"],
                    &["apiVersion", "kind", "name", "envSourceContainerName"],
                    "scaleTargetRef",
                );
                known(
                    &spec["advanced"],
                    &["horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"],
                    "advanced",
                );
                known(
                    &spec["advanced"]["horizontalPodAutoscalerConfig"],
                    &["name", "behavior"],
                    "horizontalPodAutoscalerConfig",
                );
                for t in arr(&spec["triggers"]) {
                    known(
                        t,
                        &["type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"],
                        "trigger",
                    );
                    known(&t["authenticationRef"], &["name", "kind"], "authenticationRef");
                    known(
                        &t["metadata"],
                        &[
                            "query",
                            "targetQueryValue",
                            "activationTargetQueryValue",
                            "connectionFromEnv",
                            "host",
                            "port",
                            "userName",
                            "dbName",
                            "sslmode",
                            "passwordFromEnv",
                        ],
                        "postgresql trigger metadata",
                    );
                }
            }
            "TriggerAuthentication" => {
                assert_eq!(d["apiVersion"], "keda.sh/v1alpha1");
                known(
                    &d["spec"],
                    &["secretTargetRef", "env", "configMapTargetRef", "podIdentity", "hashiCorpVault"],
                    "TriggerAuthentication.spec",
                );
                for r in arr(&d["spec"]["secretTargetRef"]) {
                    known(r, &["parameter", "name", "key"], "secretTargetRef");
                }
            }
            "PodMonitor" => {
                assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1");
                known(
                    &d["spec"],
                    &[
                        "selector",
                        "namespaceSelector",
                        "podMetricsEndpoints",
                        "jobLabel",
                        "podTargetLabels",
                        "sampleLimit",
                    ],
                    "PodMonitor.spec",
                );
                for ep in arr(&d["spec"]["podMetricsEndpoints"]) {
                    known(
                        ep,
                        &[
                            "port",
                            "path",
                            "interval",
                            "scrapeTimeout",
                            "scheme",
                            "relabelings",
                            "metricRelabelings",
                            "honorLabels",
                        ],
                        "podMetricsEndpoint",
                    );
                }
            }
            other => unreachable!("{other}"),
        }
    }
    assert_eq!(seen, CRD_KINDS.iter().map(|k| k.to_string()).collect(), "every CRD kind is shipped and checked");
}

// ----- the KEDA query against PostgreSQL --------------------------------------------

/// Seeds one account per case and runs the ScaledObject's query as shipped: the demand
/// in slots, accounts running a job plus runnable accounts (a due unordered job, or a
/// due serial head that is not running). It must equal the node's own count
/// (`AdminStore::runnable_accounts` over every partition, the `SlotDemand::total` the
/// docs promise), and the runnable accounts must be exactly the executor's due scan.
#[tokio::test]
async fn the_keda_query_counts_accounts_that_can_use_a_slot() {
    let so = load_one("overlays/keda/scaledobject.yaml");
    let query = so["spec"]["triggers"][0]["metadata"]["query"].as_str().expect("the trigger's query").to_string();

    let db = TestDb::new().await;
    let p = PartitionCount::new(16).unwrap();
    store::migrate(&db.pool).await.unwrap();
    let partitions = store::init_partitions(&db.pool, p).await.unwrap();
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let job = |account: &str| NewJob::new(account, "k", ()).unwrap();
    let enqueue = |j: NewJob| {
        let client = client.clone();
        async move { client.enqueue(j).await.unwrap().id }
    };
    let set = |id: i64, sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            let done = sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
            assert_eq!(done.rows_affected(), 1, "{sql}");
        }
    };
    const RUNNING: &str = "UPDATE warden.jobs SET state = 'running', attempt = 1, attempted_at = now() WHERE id = $1";
    const BACKING_OFF: &str =
        "UPDATE warden.jobs SET state = 'retryable', attempt = 1, due_at = now() + interval '1 hour' WHERE id = $1";
    const COMPLETED: &str =
        "UPDATE warden.jobs SET state = 'completed', attempt = 1, finished_at = now() WHERE id = $1";
    const DISCARDED: &str =
        "UPDATE warden.jobs SET state = 'discarded', attempt = 1, finished_at = now() WHERE id = $1";

    // waiting: one due serial job.
    enqueue(job("waiting")).await;
    // busy: serial head running, the next serial job due behind it.
    let head = enqueue(job("busy")).await;
    enqueue(job("busy")).await;
    set(head, RUNNING).await;
    // busy-and-unordered: serial head running and a due unordered job: two slots' worth.
    let head = enqueue(job("busy-and-unordered")).await;
    set(head, RUNNING).await;
    enqueue(job("busy-and-unordered").lane(Lane::Unordered)).await;
    // later: only a job not due yet.
    enqueue(job("later").delay(Duration::from_secs(3600))).await;
    // blocked: serial head backing off; a later serial job is due but cannot run.
    let head = enqueue(job("blocked")).await;
    enqueue(job("blocked")).await;
    set(head, BACKING_OFF).await;
    // done: only finished jobs.
    let only = enqueue(job("done")).await;
    set(only, COMPLETED).await;
    // after-discard: the discarded head is finished; the next serial job is the head.
    let head = enqueue(job("after-discard")).await;
    enqueue(job("after-discard")).await;
    set(head, DISCARDED).await;
    // unordered-running: an unordered job running, nothing else: busy.
    let only = enqueue(job("unordered-running").lane(Lane::Unordered)).await;
    set(only, RUNNING).await;

    let demand: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone())).fetch_one(&db.pool).await.unwrap();
    let busy = ["busy", "busy-and-unordered", "unordered-running"];
    let waiting = ["waiting", "busy-and-unordered", "after-discard"];
    assert_eq!(demand, (busy.len() + waiting.len()) as i64, "KEDA query: running {busy:?} + runnable {waiting:?}");
    let node_count = PgAdminStore::from(&db.pool).runnable_accounts(None, 10_000).await.unwrap();
    assert_eq!((node_count.running, node_count.runnable), (busy.len() as i64, waiting.len() as i64));
    assert_eq!(demand, node_count.total(), "the KEDA query and AdminStore::runnable_accounts disagree");

    // The waiting part is exactly what the executor's own scan finds runnable.
    let store = PgStore::new(db.pool.clone(), partitions);
    let all: Vec<u32> = (0..p.get()).collect();
    let due: BTreeSet<String> =
        store.due_accounts(&all, 10_000).await.unwrap().into_iter().map(|d| d.account).collect();
    assert_eq!(due, waiting.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(), "the executor's due scan");

    // Nothing running, nothing due: 0 (KEDA's activation threshold is 0).
    sqlx::query("UPDATE warden.jobs SET state = 'completed', finished_at = now() WHERE state <> 'completed'")
        .execute(&db.pool)
        .await
        .unwrap();
    let idle: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query)).fetch_one(&db.pool).await.unwrap();
    assert_eq!(idle, 0);
    db.drop_database().await.unwrap();
}
