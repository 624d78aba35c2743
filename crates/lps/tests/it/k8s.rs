//! The Kubernetes manifests (deploy/k8s/, each overlay rendered by `kubectl kustomize`)
//! against the local topology (`lps::topology::services`, the source of truth for the
//! wiring) and against the services' own configuration parsers, as compose.rs does for the
//! compose files: every target, broker, topic, port and probe, followed through the
//! Services and the pods they select.
//!
//! Kubernetes names the tiers, not the replicas: the topology's `ars-comp-1-{1,2,3}` is
//! the `ars-comp-1` Deployment, `proxy1-{1,2,3}` the `legacy-proxy-1` StatefulSet. The
//! schemas are checked by scripts/k8s-validate.sh; nothing here needs a cluster. Each check
//! reports every problem it finds, naming the overlay and the workload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use clap::Parser;
use lps::topology::{self, Broker, Health, Options, Program, ServiceSpec, Topology};
use lps_common::config::{ENV_LOG_DIR, ENV_SERVICE_NAME, ENV_SIM_MODEL, ENV_TARGET_URL};
use lps_common::wire::HEALTHZ_PATH;
use serde_json::Value;

use crate::support::{MOSQUITTO_CONF, mosquitto_listener, repo, topic_matches, upstream_targets};

/// The overlays under deploy/k8s/overlays/.
const OVERLAYS: [&str; 3] = ["legacy", "ng", "ng-emqx"];

const COMPOSE_NG: &str = "docker-compose-ng.yml";

/// Where the image writes logs when `LOG_DIR` is unset (the Dockerfile's `ENV LOG_DIR`).
const IMAGE_LOG_DIR: &str = "/app/logs";

/// Sysctls every kubelet allows (Kubernetes 1.30's safe set): any other one keeps a pod
/// from starting unless the kubelet allow-lists it (`--allowed-unsafe-sysctls`).
const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

// ---------------------------------------------------------------------------------------
// Rendering and the rendered model
// ---------------------------------------------------------------------------------------

/// Overlay → its resources, or why they could not be rendered.
type Rendered = BTreeMap<&'static str, Result<Vec<Value>, String>>;

/// Every overlay rendered once per test binary.
fn rendered() -> &'static Rendered {
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    RENDERED.get_or_init(|| OVERLAYS.iter().map(|o| (*o, render(o))).collect())
}

/// `kubectl kustomize deploy/k8s/overlays/<overlay>`, parsed. A missing kubectl fails the
/// test (as a missing docker-compose fails compose.rs): scripts/test.sh installs it.
fn render(overlay: &str) -> Result<Vec<Value>, String> {
    let dir = repo().join("deploy/k8s/overlays").join(overlay);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .map_err(|e| {
            format!(
                "running kubectl: {e}. The Kubernetes wiring tests render the manifests with \
                 `kubectl kustomize`; scripts/test.sh installs it (Debian: apt-get install -y \
                 kubernetes-client)"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "kubectl kustomize {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| format!("{overlay}: not YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// One rendered overlay.
struct Manifests {
    docs: Vec<Value>,
}

fn manifests(overlay: &'static str) -> Manifests {
    match &rendered()[overlay] {
        Ok(docs) => Manifests { docs: docs.clone() },
        Err(e) => panic!("{e}"),
    }
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_owned)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `selector` (a plain label map) selects `labels`; an empty one selects all.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A `metav1.LabelSelector` (`matchLabels` and `matchExpressions` with In/NotIn/Exists).
fn label_selector_selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    if !selects(&string_map(&selector["matchLabels"]), labels) {
        return false;
    }
    selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let have = labels.get(key).map(String::as_str);
            match e["operator"].as_str() {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => !have.is_some_and(|h| values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            }
        })
}

/// A Deployment or StatefulSet, or the pods the EMQX operator makes.
struct Workload<'a> {
    kind: &'a str,
    name: &'a str,
    doc: &'a Value,
    /// The pod template's labels.
    labels: BTreeMap<String, String>,
}

impl<'a> Workload<'a> {
    fn pod(&self) -> &'a Value {
        &self.doc["spec"]["template"]["spec"]
    }

    fn container(&self) -> &'a Value {
        &self.pod()["containers"][0]
    }

    /// The container's ports: name → number.
    fn ports(&self) -> BTreeMap<String, u16> {
        self.container()["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    p["containerPort"].as_u64().unwrap_or_default() as u16,
                )
            })
            .collect()
    }

    /// A port by number or by name (`targetPort`, probe ports).
    fn port(&self, port: &Value) -> Option<u16> {
        match port {
            Value::Number(n) => n.as_u64().map(|n| n as u16),
            Value::String(s) => self.ports().get(s).copied(),
            _ => None,
        }
    }

    /// Pod names: `<name>-<ordinal>` for a StatefulSet, one stand-in for a Deployment.
    fn pod_names(&self) -> Vec<String> {
        let replicas = self.doc["spec"]["replicas"].as_u64().unwrap_or(1);
        match self.kind {
            "StatefulSet" => (0..replicas)
                .map(|i| format!("{}-{i}", self.name))
                .collect(),
            _ => vec![format!("{}-5d4b9c7f8-x2x7q", self.name)],
        }
    }

    /// The container's environment in `pod`, resolved as the kubelet does: the downward
    /// API's `metadata.name`, and `$(VAR)` for variables defined *earlier* in the list.
    fn env(&self, pod: &str) -> Result<HashMap<String, String>, String> {
        let mut env = HashMap::new();
        for var in self.container()["env"].as_array().into_iter().flatten() {
            let key = var["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = var["value"].as_str() {
                expand(v, &env)
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod.to_owned()
            } else {
                return Err(format!(
                    "{}: {key} comes from {}",
                    self.name, var["valueFrom"]
                ));
            };
            env.insert(key, value);
        }
        Ok(env)
    }

    /// Paths mounted from a volume (writable unless `readOnly`), and whether the volume is
    /// a claim of the StatefulSet: mount path → (volume, read-only, claim).
    fn mounts(&self) -> BTreeMap<String, (String, bool, bool)> {
        let claims: BTreeSet<&str> = self.doc["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(name)
            .collect();
        self.container()["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let volume = m["name"].as_str().unwrap_or_default();
                (
                    m["mountPath"].as_str().unwrap_or_default().to_owned(),
                    (
                        volume.to_owned(),
                        m["readOnly"].as_bool().unwrap_or(false),
                        claims.contains(volume),
                    ),
                )
            })
            .collect()
    }
}

/// Kubernetes' `$(VAR)` expansion; an undefined reference stays as written.
fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("$(") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl Manifests {
    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_owned();
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    fn get(&self, kind: &str, wanted: &str) -> Option<&Value> {
        self.of_kind(kind).find(|d| name(d) == wanted)
    }

    fn workloads(&self) -> Vec<Workload<'_>> {
        self.docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
            .map(|d| Workload {
                kind: d["kind"].as_str().unwrap_or_default(),
                name: name(d),
                doc: d,
                labels: string_map(&d["spec"]["template"]["metadata"]["labels"]),
            })
            .collect()
    }

    fn workload(&self, wanted: &str) -> Option<Workload<'_>> {
        self.workloads().into_iter().find(|w| w.name == wanted)
    }

    /// The EMQX custom resource, if the overlay has one.
    fn emqx(&self) -> Option<&Value> {
        self.of_kind("EMQX").next()
    }

    /// Labels of the EMQX pods: the operator's instance label plus the templates' labels
    /// (core and replicant must agree, one Service selects both).
    fn emqx_labels(&self) -> Option<BTreeMap<String, String>> {
        let emqx = self.emqx()?;
        let mut labels = string_map(&emqx["spec"]["coreTemplate"]["metadata"]["labels"]);
        labels.insert("apps.emqx.io/instance".into(), name(emqx).into());
        Some(labels)
    }

    /// The port EMQX's default TCP listener binds (`listeners.tcp.default.bind`).
    fn emqx_listener(&self) -> Option<u16> {
        let data = self.emqx()?["spec"]["config"]["data"].as_str()?;
        let bind = data
            .split("listeners.tcp.default")
            .nth(1)?
            .split("bind")
            .nth(1)?;
        let addr = bind.split('"').nth(1)?;
        addr.rsplit(':').next()?.parse().ok()
    }

    /// Where `host:port` leads inside the cluster: (workload, container port). `host` is
    /// a Service (its selector, port and targetPort followed to the one workload it
    /// selects) or the listeners Service the EMQX operator makes (`<name>-listeners`).
    fn reach(&self, host: &str, port: u16) -> Result<(String, u16), String> {
        if let Some(emqx) = self.emqx() {
            if host == format!("{}-listeners", name(emqx)) {
                return match self.emqx_listener() {
                    Some(p) if p == port => Ok(("emqx".to_owned(), p)),
                    other => Err(format!(
                        "{host}:{port}: EMQX's tcp listener binds {other:?}, not {port}"
                    )),
                };
            }
        }
        let service = self
            .get("Service", host)
            .ok_or_else(|| format!("{host}:{port}: no Service {host}"))?;
        let entry = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"].as_u64() == Some(u64::from(port)))
            .ok_or_else(|| format!("{host}:{port}: Service {host} has no port {port}"))?;
        let selector = string_map(&service["spec"]["selector"]);
        let targets: Vec<Workload<'_>> = self
            .workloads()
            .into_iter()
            .filter(|w| !selector.is_empty() && selects(&selector, &w.labels))
            .collect();
        let [target] = targets.as_slice() else {
            return Err(format!(
                "{host}:{port}: Service {host} selects {} workloads, not one",
                targets.len()
            ));
        };
        let target_port = match &entry["targetPort"] {
            Value::Null => Value::from(port),
            p => p.clone(),
        };
        let container_port = target.port(&target_port).ok_or_else(|| {
            format!(
                "{host}:{port}: targetPort {target_port} is not a port of {}",
                target.name
            )
        })?;
        Ok((target.name.to_owned(), container_port))
    }

    /// Whether a NetworkPolicy lets pods labelled `from` reach `to`'s pods on `port`.
    fn admits(
        &self,
        from: &BTreeMap<String, String>,
        to: &BTreeMap<String, String>,
        port: u16,
    ) -> bool {
        self.of_kind("NetworkPolicy")
            .filter(|p| label_selector_selects(&p["spec"]["podSelector"], to))
            .flat_map(|p| p["spec"]["ingress"].as_array().cloned().unwrap_or_default())
            .any(|rule| {
                let peers = rule["from"].as_array().cloned().unwrap_or_default();
                let ports = rule["ports"].as_array().cloned().unwrap_or_default();
                let peer_ok = peers.is_empty()
                    || peers.iter().any(|peer| {
                        // Same namespace only: a namespaceSelector means other namespaces
                        // (and a peer without a podSelector means whole namespaces).
                        peer["namespaceSelector"].is_null()
                            && !peer["podSelector"].is_null()
                            && label_selector_selects(&peer["podSelector"], from)
                    });
                let port_ok = ports.is_empty()
                    || ports
                        .iter()
                        .any(|p| p["port"].as_u64() == Some(u64::from(port)));
                peer_ok && port_ok
            })
    }

    /// Whether some NetworkPolicy selects pods labelled `labels` (else all is allowed).
    fn isolated(&self, labels: &BTreeMap<String, String>) -> bool {
        self.of_kind("NetworkPolicy")
            .any(|p| label_selector_selects(&p["spec"]["podSelector"], labels))
    }
}

// ---------------------------------------------------------------------------------------
// The topology each overlay implements
// ---------------------------------------------------------------------------------------

fn topology_of(overlay: &str) -> (Topology, Option<Broker>) {
    match overlay {
        "legacy" => (Topology::Legacy, None),
        "ng" => (
            Topology::Ng,
            Some(Broker::Mosquitto {
                config: repo().join(MOSQUITTO_CONF),
            }),
        ),
        // An external broker: `lps experiment --broker mqtt://HOST:PORT`.
        "ng-emqx" => (
            Topology::Ng,
            Some(Broker::External {
                host: "emqx".into(),
                port: 1883,
            }),
        ),
        other => panic!("unknown overlay {other}"),
    }
}

fn specs(overlay: &str) -> Vec<ServiceSpec> {
    let (topology, broker) = topology_of(overlay);
    topology::services(topology, &Options::default(), broker.as_ref())
}

/// The Kubernetes workload running a topology service: one per tier.
fn k8s_name(spec: &ServiceSpec) -> String {
    match spec.program {
        Program::RastSimulator | Program::Mosquitto | Program::EmbeddedBroker => spec.name.clone(),
        program => program.name().to_owned(),
    }
}

/// The workload holding the broker of `overlay`, if it is NG.
fn broker_of(overlay: &str) -> Option<&'static str> {
    match topology_of(overlay).1 {
        Some(Broker::External { .. }) => Some("emqx"),
        Some(_) => Some("mosquitto"),
        None => None,
    }
}

/// Replicas per tier in the topology: k8s name → count.
fn tiers(specs: &[ServiceSpec]) -> BTreeMap<String, usize> {
    let mut tiers = BTreeMap::new();
    for spec in specs {
        *tiers.entry(k8s_name(spec)).or_insert(0) += 1;
    }
    tiers
}

/// What a service is configured to do, read with its own configuration parser.
#[derive(Debug, Default)]
struct Wiring {
    bind: u16,
    /// `(host, port, path)` of every HTTP target.
    targets: Vec<(String, u16, String)>,
    broker: Option<(String, u16)>,
    client_id: Option<String>,
    topic: Option<String>,
    filters: Vec<String>,
    /// The simulator's ledger folder.
    journal: Option<PathBuf>,
}

fn wiring(
    program: Program,
    env: &HashMap<String, String>,
    args: &[String],
) -> Result<Wiring, String> {
    let err = |e: lps_common::config::ConfigError| format!("its binary rejects the env: {e}");
    let mut w = Wiring::default();
    match program {
        Program::ArsComp1 => {
            let c = ars_comp_1::Config::from_lookup(env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, upstream_targets(&c.upstream));
        }
        Program::ArsComp2 => {
            let c = ars_comp_2::Config::from_lookup(env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, upstream_targets(&c.upstream));
        }
        Program::LegacyProxy1 => {
            let c = legacy_proxy_1::Config::from_lookup(env).map_err(err)?;
            w.bind = c.server.port;
            w.broker = Some((c.mqtt.host, c.mqtt.port));
            w.client_id = Some(c.mqtt.client_id);
            w.topic = Some(c.topic);
            w.journal = c.journal_dir;
        }
        Program::LegacyProxy2 => {
            let c = legacy_proxy_2::Config::from_lookup(env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, upstream_targets(&c.upstream));
            w.broker = Some((c.mqtt.host, c.mqtt.port));
            w.client_id = Some(c.mqtt.client_id);
            w.filters = lps_common::wire::bridge_filters(&c.group).into();
        }
        Program::RastSimulator => {
            let mut argv = vec!["rast-simulator".to_owned()];
            argv.extend(args.iter().cloned());
            if let Some(model) = env.get(ENV_SIM_MODEL) {
                argv.extend(["--model".to_owned(), model.clone()]);
            }
            let args = rast_simulator::Args::try_parse_from(&argv)
                .map_err(|e| format!("rast-simulator rejects {argv:?}: {e}"))?;
            let c = rast_simulator::Config::new(env, &args).map_err(err)?;
            w.bind = c.server.port;
            w.journal = Some(c.journal_dir);
        }
        Program::Mosquitto => w.bind = mosquitto_listener(),
        other => {
            return Err(format!(
                "{} is not part of a Kubernetes overlay",
                other.name()
            ));
        }
    }
    Ok(w)
}

/// `$share/<group>/<filter>` → `<filter>`.
fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|f| f.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// The workload a topology spec's env points at (by the topology's own ports).
fn topology_target(specs: &[ServiceSpec], port: u16) -> Option<String> {
    specs.iter().find(|s| s.port == port).map(k8s_name)
}

fn program_of(workload: &Workload<'_>) -> Option<Program> {
    // Mosquitto runs its image's own command.
    if workload.container()["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("eclipse-mosquitto:"))
    {
        return Some(Program::Mosquitto);
    }
    let command = workload.container()["command"][0].as_str()?;
    [
        Program::ArsComp1,
        Program::ArsComp2,
        Program::RastSimulator,
        Program::LegacyProxy1,
        Program::LegacyProxy2,
    ]
    .into_iter()
    .find(|p| p.name() == command)
}

fn httpget(probe: &Value) -> Option<(&str, &Value)> {
    Some((
        probe["httpGet"]["path"].as_str()?,
        &probe["httpGet"]["port"],
    ))
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// Every problem of `overlay` against its topology.
fn check_wiring(overlay: &'static str) -> Vec<String> {
    let m = manifests(overlay);
    let specs = specs(overlay);
    let mut problems = Vec::new();
    let mut fail =
        |workload: &str, what: String| problems.push(format!("{overlay}: {workload}: {what}"));

    // The same tiers (an external broker is no workload: the EMQX operator makes its pods).
    let want: BTreeSet<String> = specs.iter().map(k8s_name).collect();
    let have: BTreeSet<String> = m.workloads().iter().map(|w| w.name.to_owned()).collect();
    for n in want.difference(&have) {
        fail(n, "in the topology, no Deployment or StatefulSet".into());
    }
    for n in have.difference(&want) {
        fail(n, "a workload the topology does not have".into());
    }
    if topology_of(overlay)
        .1
        .is_some_and(|b| matches!(b, Broker::External { .. }))
        && m.emqx().is_none()
    {
        fail(
            "emqx",
            "the overlay has no EMQX resource for its external broker".into(),
        );
    }

    // Each tier, wired as its first replica in the topology.
    let mut seen = BTreeSet::new();
    for spec in &specs {
        let tier = k8s_name(spec);
        if !seen.insert(tier.clone()) {
            continue;
        }
        let Some(workload) = m.workload(&tier) else {
            continue;
        };
        let Some(program) = program_of(&workload) else {
            fail(
                &tier,
                format!(
                    "runs {}, not {}",
                    workload.container()["command"],
                    spec.program.name()
                ),
            );
            continue;
        };
        if program != spec.program {
            fail(
                &tier,
                format!(
                    "runs {}, the topology {}",
                    program.name(),
                    spec.program.name()
                ),
            );
            continue;
        }
        let topo_env: HashMap<String, String> = spec.env.iter().cloned().collect();
        let topo = match wiring(program, &topo_env, &spec.args) {
            Ok(w) => w,
            Err(e) => panic!("{overlay}: topology {}: {e}", spec.name),
        };
        let args: Vec<String> = workload.container()["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        for pod in workload.pod_names() {
            let env = match workload.env(&pod) {
                Ok(env) => env,
                Err(e) => {
                    fail(&tier, e);
                    continue;
                }
            };
            let k8s = match wiring(program, &env, &args) {
                Ok(w) => w,
                Err(e) => {
                    fail(&pod, e);
                    continue;
                }
            };
            // Listening where the pod spec says, and probed there.
            let ports = workload.ports();
            if !ports.values().any(|p| *p == k8s.bind) {
                fail(
                    &pod,
                    format!(
                        "listens on {}, not a declared container port ({ports:?})",
                        k8s.bind
                    ),
                );
            }
            check_probes(&workload, spec, k8s.bind, &mut |w| fail(&pod, w));
            // HTTP targets: the same tiers, through Services, on the same path.
            let want: BTreeSet<(String, String)> = topo
                .targets
                .iter()
                .map(|(_, port, path)| {
                    (
                        topology_target(&specs, *port).unwrap_or_else(|| format!("port {port}")),
                        path.clone(),
                    )
                })
                .collect();
            let mut got = BTreeSet::new();
            for (host, port, path) in &k8s.targets {
                match m.reach(host, *port) {
                    Ok((target, container_port)) => {
                        let listens = m
                            .workload(&target)
                            .and_then(|t| t.env(&t.pod_names()[0]).ok().map(|e| (t, e)))
                            .and_then(|(t, e)| wiring(program_of(&t)?, &e, &[]).ok())
                            .map(|w| w.bind);
                        if listens != Some(container_port) {
                            fail(
                                &pod,
                                format!(
                                    "{ENV_TARGET_URL} reaches {target} on port {container_port}, which listens on {listens:?}"
                                ),
                            );
                        }
                        got.insert((target, path.clone()));
                    }
                    Err(e) => fail(&pod, format!("{ENV_TARGET_URL}: {e}")),
                }
            }
            if want != got {
                fail(
                    &pod,
                    format!("forwards to {got:?}, the topology to {want:?}"),
                );
            }
            // The broker, by Service name.
            match (&topo.broker, &k8s.broker) {
                (None, None) => {}
                (Some(_), Some((host, port))) => match m.reach(host, *port) {
                    Ok((target, container_port)) => {
                        let broker = broker_of(overlay).unwrap_or_default();
                        if target != broker {
                            fail(
                                &pod,
                                format!("its broker {host}:{port} leads to {target}, not {broker}"),
                            );
                        }
                        if target == "mosquitto" && container_port != mosquitto_listener() {
                            fail(
                                &pod,
                                format!(
                                    "reaches Mosquitto on {container_port}, mosquitto.conf listens on {}",
                                    mosquitto_listener()
                                ),
                            );
                        }
                    }
                    Err(e) => fail(&pod, format!("broker: {e}")),
                },
                (t, k) => fail(&pod, format!("broker {k:?}, the topology {t:?}")),
            }
            // Topics and filters.
            if topo.filters != k8s.filters {
                fail(
                    &pod,
                    format!(
                        "subscribes to {:?}, the topology to {:?}",
                        k8s.filters, topo.filters
                    ),
                );
            }
            match (&topo.topic, &k8s.topic) {
                (None, None) => {}
                (Some(_), Some(topic)) => {
                    let subscriber = specs
                        .iter()
                        .find(|s| s.program == Program::LegacyProxy2)
                        .map(|s| {
                            let env: HashMap<String, String> = s.env.iter().cloned().collect();
                            wiring(s.program, &env, &s.args)
                                .expect("topology legacy-proxy-2")
                                .filters
                        })
                        .unwrap_or_default();
                    // First deliveries only: a topic that also matched the retry filter
                    // would be taken for a retry.
                    let [first, retry] = subscriber.as_slice() else {
                        panic!("legacy-proxy-2 subscribes to {subscriber:?}");
                    };
                    for (whose, t) in [
                        ("the topology's", topo.topic.as_deref().unwrap_or_default()),
                        ("its", topic.as_str()),
                    ] {
                        if !topic_matches(unshared(first), t) || topic_matches(unshared(retry), t) {
                            fail(
                                &pod,
                                format!("{whose} topic {t} is not matched by {first} alone"),
                            );
                        }
                    }
                }
                (t, k) => fail(&pod, format!("topic {k:?}, the topology {t:?}")),
            }
            // Files go to volumes: the root filesystem is read-only.
            let mounts = workload.mounts();
            let log_dir = env
                .get(ENV_LOG_DIR)
                .cloned()
                .unwrap_or_else(|| IMAGE_LOG_DIR.to_owned());
            let mut dirs = vec![(ENV_LOG_DIR, PathBuf::from(&log_dir))];
            dirs.extend(k8s.journal.iter().map(|j| ("journal", j.clone())));
            if program != Program::Mosquitto {
                for (what, dir) in dirs {
                    match mounts.get(dir.to_str().unwrap_or_default()) {
                        Some((_, false, _)) => {}
                        _ => fail(
                            &pod,
                            format!("{what} {} is not a writable volume mount", dir.display()),
                        ),
                    }
                }
            }
        }
    }
    problems
}

/// Readiness on the topology's health path (`/readyz` for the bridges), liveness on
/// `/healthz`, both on the port the service binds.
fn check_probes(
    workload: &Workload<'_>,
    spec: &ServiceSpec,
    bind: u16,
    fail: &mut dyn FnMut(String),
) {
    let container = workload.container();
    let (readiness, liveness) = (&container["readinessProbe"], &container["livenessProbe"]);
    match spec.health {
        Health::Http(path) => {
            for (which, probe, want) in [
                ("readiness", readiness, path),
                ("liveness", liveness, HEALTHZ_PATH),
            ] {
                match httpget(probe) {
                    Some((got, port)) if got == want && workload.port(port) == Some(bind) => {}
                    _ => fail(format!(
                        "{which} probe {probe}, want GET {want} on port {bind}"
                    )),
                }
            }
        }
        Health::Tcp => {
            let tcp = &liveness["tcpSocket"]["port"];
            if tcp.is_null() || workload.port(tcp) != Some(bind) {
                fail(format!(
                    "liveness probe {liveness}, want a TCP connect to {bind}"
                ));
            }
            if readiness.is_null() {
                fail("no readiness probe".into());
            }
        }
    }
}

#[test]
fn kubernetes_wiring_matches_the_topology() {
    let problems: Vec<String> = OVERLAYS.iter().flat_map(|o| check_wiring(o)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn bridges_are_statefulsets_whose_client_id_is_the_pod_name() {
    let mut problems = Vec::new();
    for overlay in ["ng", "ng-emqx"] {
        let m = manifests(overlay);
        let tiers = tiers(&specs(overlay));
        for (tier, program) in [
            ("legacy-proxy-1", Program::LegacyProxy1),
            ("legacy-proxy-2", Program::LegacyProxy2),
        ] {
            let Some(w) = m.workload(tier) else {
                problems.push(format!("{overlay}: no {tier}"));
                continue;
            };
            if w.kind != "StatefulSet" {
                problems.push(format!(
                    "{overlay}: {tier} is a {}, not a StatefulSet",
                    w.kind
                ));
            }
            let replicas = w.doc["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            if replicas != tiers[tier] {
                problems.push(format!(
                    "{overlay}: {tier} has {replicas} replicas, the topology {}",
                    tiers[tier]
                ));
            }
            let field = &w.container()["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == ENV_SERVICE_NAME)
                .cloned()
                .unwrap_or_default()["valueFrom"]["fieldRef"]["fieldPath"];
            if field != "metadata.name" {
                problems.push(format!("{overlay}: {tier}: {ENV_SERVICE_NAME} is not the pod name (downward API metadata.name)"));
            }
            let mut topics = BTreeSet::new();
            for pod in w.pod_names() {
                let wiring = w.env(&pod).and_then(|e| wiring(program, &e, &[]));
                match wiring {
                    Ok(wiring) => {
                        if wiring.client_id.as_deref() != Some(pod.as_str()) {
                            problems.push(format!(
                                "{overlay}: {pod}: client id {:?}",
                                wiring.client_id
                            ));
                        }
                        if let Some(topic) = wiring.topic {
                            if !topics.insert(topic.clone()) {
                                problems.push(format!(
                                    "{overlay}: {pod}: topic {topic} taken by another replica"
                                ));
                            }
                        }
                        // The replay journal survives the pod: on its own claim.
                        if let Some(journal) = wiring.journal {
                            match w.mounts().get(journal.to_str().unwrap_or_default()) {
                                Some((_, false, true)) => {}
                                other => problems.push(format!(
                                    "{overlay}: {pod}: journal {} is not on a claim of the StatefulSet ({other:?})",
                                    journal.display()
                                )),
                            }
                        }
                    }
                    Err(e) => problems.push(format!("{overlay}: {pod}: {e}")),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every hop of the wiring is admitted by the callee's NetworkPolicy, and every tier has
/// one (a pod no policy selects admits everything).
#[test]
fn network_policies_admit_the_wiring() {
    let mut problems = Vec::new();
    for overlay in OVERLAYS {
        let m = manifests(overlay);
        let mut tiers: Vec<(String, BTreeMap<String, String>)> = m
            .workloads()
            .iter()
            .map(|w| (w.name.to_owned(), w.labels.clone()))
            .collect();
        tiers.extend(m.emqx_labels().map(|l| ("emqx".to_owned(), l)));
        for (tier, labels) in &tiers {
            if !m.isolated(labels) {
                problems.push(format!(
                    "{overlay}: {tier}: no NetworkPolicy selects its pods"
                ));
            }
        }
        for w in m.workloads() {
            let Ok(env) = w.env(&w.pod_names()[0]) else {
                continue;
            };
            let Some(program) = program_of(&w) else {
                continue;
            };
            let Ok(wiring) = wiring(program, &env, &[]) else {
                continue;
            };
            let hops = wiring
                .targets
                .iter()
                .map(|(h, p, _)| (h.clone(), *p))
                .chain(wiring.broker.clone());
            for (host, port) in hops {
                let Ok((target, container_port)) = m.reach(&host, port) else {
                    continue;
                };
                let Some((_, to)) = tiers.iter().find(|(n, _)| *n == target) else {
                    continue;
                };
                if !m.admits(&w.labels, to, container_port) {
                    problems.push(format!(
                        "{overlay}: {}: its NetworkPolicy keeps {} out (port {container_port})",
                        target, w.name
                    ));
                }
            }
        }
        // The entry takes clients from anywhere.
        let stranger = BTreeMap::from([("app.kubernetes.io/name".to_owned(), "client".to_owned())]);
        if let Some(entry) = m.workload("ars-comp-1") {
            let port = entry.ports().get("http").copied().unwrap_or_default();
            if !m.admits(&stranger, &entry.labels, port) {
                problems.push(format!(
                    "{overlay}: ars-comp-1: its NetworkPolicy keeps clients out"
                ));
            }
        }
        // And a stranger does not reach the backend or the broker.
        for tier in ["ars-comp-3", "mosquitto", "emqx"] {
            let Some((_, labels)) = tiers.iter().find(|(n, _)| n == tier) else {
                continue;
            };
            for port in [1337, 1883, 8080] {
                if m.admits(&stranger, labels, port) {
                    problems.push(format!("{overlay}: {tier}: any pod reaches it on {port}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn mosquitto_runs_the_repository_config() {
    let m = manifests("ng");
    let conf = std::fs::read_to_string(repo().join(MOSQUITTO_CONF)).expect("mosquitto.conf");
    let broker = m.workload("mosquitto").expect("a mosquitto workload");
    assert_eq!(broker.kind, "StatefulSet");
    // The config: the repository's file, verbatim, where the image reads it.
    let volume = broker.pod()["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| !v["configMap"].is_null())
        .expect("a ConfigMap volume");
    let map = m
        .get(
            "ConfigMap",
            volume["configMap"]["name"].as_str().unwrap_or_default(),
        )
        .expect("the ConfigMap the volume names");
    assert_eq!(
        map["data"]["mosquitto.conf"].as_str(),
        Some(conf.as_str()),
        "the ConfigMap's mosquitto.conf differs from {MOSQUITTO_CONF}: copy the file into \
         deploy/k8s/overlays/ng/mosquitto.yaml (indented by 4)"
    );
    let mounts = broker.mounts();
    assert_eq!(
        mounts.get("/mosquitto/config").map(|(v, ..)| v.as_str()),
        volume["name"].as_str(),
        "the config is not mounted at /mosquitto/config"
    );
    // Persistence on the StatefulSet's claim.
    let location = conf
        .lines()
        .find_map(|l| l.strip_prefix("persistence_location "))
        .expect("persistence_location")
        .trim()
        .trim_end_matches('/');
    assert!(
        matches!(mounts.get(location), Some((_, false, true))),
        "{location} (persistence_location) is not on a claim: {mounts:?}"
    );
    // The image compose runs.
    let compose = std::fs::read_to_string(repo().join(COMPOSE_NG)).expect("compose file");
    let image = compose
        .split("${MOSQUITTO_IMAGE:-")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .expect("MOSQUITTO_IMAGE's default in docker-compose-ng.yml");
    assert_eq!(broker.container()["image"].as_str(), Some(image));
}

/// The compose files' per-container sysctls that Kubernetes counts as safe are set on
/// every pod, with the same values; the unsafe ones are not (the pod would not start).
#[test]
fn pods_set_only_safe_sysctls_with_the_compose_values() {
    let compose: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join(COMPOSE_NG)).expect("compose file"),
    )
    .expect("compose YAML");
    let wanted: BTreeMap<String, String> = string_map(&compose["x-lps"]["sysctls"])
        .into_iter()
        .filter(|(k, _)| SAFE_SYSCTLS.contains(&k.as_str()))
        .collect();
    assert!(!wanted.is_empty(), "no safe sysctl in {COMPOSE_NG}'s x-lps");
    let mut problems = Vec::new();
    for overlay in OVERLAYS {
        let m = manifests(overlay);
        for w in m.workloads() {
            let set: BTreeMap<String, String> = w.pod()["securityContext"]["sysctls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_owned(),
                        s["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            for name in set.keys().filter(|k| !SAFE_SYSCTLS.contains(&k.as_str())) {
                problems.push(format!("{overlay}: {}: unsafe sysctl {name}", w.name));
            }
            if set != wanted {
                problems.push(format!(
                    "{overlay}: {}: sysctls {set:?}, compose's safe ones {wanted:?}",
                    w.name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Requests and limits on every container; a PodDisruptionBudget for every tier of more
/// than one pod; the stateless tiers autoscaled from at least the topology's count.
#[test]
fn workloads_have_resources_budgets_and_autoscalers() {
    let mut problems = Vec::new();
    for overlay in OVERLAYS {
        let m = manifests(overlay);
        let tiers = tiers(&specs(overlay));
        let budgets: Vec<&Value> = m.of_kind("PodDisruptionBudget").collect();
        let mut pods: Vec<(String, BTreeMap<String, String>, usize)> = Vec::new();
        for w in m.workloads() {
            let resources = &w.container()["resources"];
            for field in ["requests.cpu", "requests.memory", "limits.memory"] {
                let (a, b) = field.split_once('.').unwrap_or_default();
                if resources[a][b].is_null() {
                    problems.push(format!("{overlay}: {}: no {field}", w.name));
                }
            }
            let want = tiers.get(w.name).copied().unwrap_or(1);
            let scaler = m
                .of_kind("HorizontalPodAutoscaler")
                .find(|h| h["spec"]["scaleTargetRef"]["name"] == w.name);
            let replicas = match (w.kind, scaler) {
                ("Deployment", Some(h)) => h["spec"]["minReplicas"].as_u64().unwrap_or(1) as usize,
                ("Deployment", None) if want > 1 => {
                    problems.push(format!(
                        "{overlay}: {}: {want} replicas in the topology, no autoscaler",
                        w.name
                    ));
                    w.doc["spec"]["replicas"].as_u64().unwrap_or(1) as usize
                }
                _ => w.doc["spec"]["replicas"].as_u64().unwrap_or(1) as usize,
            };
            if replicas < want {
                problems.push(format!(
                    "{overlay}: {}: {replicas} replicas at least, the topology runs {want}",
                    w.name
                ));
            }
            pods.push((w.name.to_owned(), w.labels.clone(), replicas));
        }
        if let (Some(emqx), Some(labels)) = (m.emqx(), m.emqx_labels()) {
            // One PodDisruptionBudget and one NetworkPolicy cover both kinds of node.
            let spec = &emqx["spec"];
            let core = string_map(&spec["coreTemplate"]["metadata"]["labels"]);
            let replicant = string_map(&spec["replicantTemplate"]["metadata"]["labels"]);
            if core != replicant {
                problems.push(format!(
                    "{overlay}: emqx: core labels {core:?}, replicant labels {replicant:?}"
                ));
            }
            pods.push(("emqx".into(), labels, 2));
        }
        for (tier, labels, _) in pods.iter().filter(|(_, _, replicas)| *replicas > 1) {
            if !budgets
                .iter()
                .any(|b| label_selector_selects(&b["spec"]["selector"], labels))
            {
                problems.push(format!("{overlay}: {tier}: no PodDisruptionBudget"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The EMQX cluster offers what the bridges check in its CONNACK: shared subscriptions
/// and QoS 2; an odd number of core nodes; the open-source line (5.8).
#[test]
fn emqx_cluster_offers_what_the_bridges_need() {
    let m = manifests("ng-emqx");
    let emqx = m.emqx().expect("an EMQX resource");
    assert_eq!(emqx["apiVersion"], "apps.emqx.io/v2beta1");
    let image = emqx["spec"]["image"].as_str().unwrap_or_default();
    assert!(
        image.starts_with("emqx/emqx:5.8."),
        "{image}: EMQX 5.9+ needs a license to cluster; 5.8.x is the open-source line"
    );
    let config = emqx["spec"]["config"]["data"].as_str().unwrap_or_default();
    let setting = |key: &str| {
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('='))
            .map(str::trim)
    };
    assert_eq!(setting("max_qos_allowed"), Some("2"), "{config}");
    assert_eq!(setting("shared_subscription"), Some("true"), "{config}");
    let core = emqx["spec"]["coreTemplate"]["spec"]["replicas"]
        .as_u64()
        .unwrap_or(2);
    assert!(
        core >= 3 && core % 2 == 1,
        "{core} core nodes: want an odd number, at least 3"
    );
    assert_eq!(m.emqx_listener(), Some(1883));
}

#[test]
fn helpers_expand_and_match_like_kubernetes_and_mqtt() {
    let env = HashMap::from([("A".to_owned(), "x".to_owned())]);
    assert_eq!(expand("$(A)/message", &env), "x/message");
    assert_eq!(expand("$(B)/$(A)", &env), "$(B)/x");
    assert_eq!(unshared("$share/g/+/message"), "+/message");
    assert!(topic_matches("+/message", "legacy-proxy-1-0/message"));
    assert!(!topic_matches("+/message", "$(SERVICE_NAME)/retry/message"));
}
