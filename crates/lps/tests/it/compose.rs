//! The compose topologies at the repository root against the local topology
//! (`lps::topology::services`, the source of truth for names, ports and wiring), against
//! the services' own configuration parsers, and against `docker-compose config`.
//!
//! The YAML is read as compose reads it: merge keys resolved, `${VAR:-default}`
//! interpolated with an empty environment (so every variable needs a default), `$$`
//! unescaped. Each check reports every problem it finds, naming the service.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use lps::topology::{self, Broker, Health, Options, Program, ServiceSpec, Topology};
use lps_common::config::{
    ENV_HTTP_PORT, ENV_LOG_DIR, ENV_MQTT_BROKER, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_TOPIC,
    ENV_SERVICE_NAME, ENV_SIM_MODEL, ENV_TARGET_URL, ENV_TOKIO_WORKER_THREADS,
};
use lps_common::service::HEALTHCHECK_PATH;
use lps_common::upstream::UpstreamConfig;
use serde::Deserialize;

use crate::support::{MOSQUITTO_CONF, mosquitto_listener, repo, topic_matches, upstream_targets};

const LEGACY: &str = "docker-compose-legacy.yml";
const NG: &str = "docker-compose-ng.yml";
const NG_NETEM: &str = "docker-compose-netem.yml";
const LEGACY_NETEM: &str = "docker-compose-legacy-netem.yml";

/// Where the logs of every LPS container go (and the image's `LOG_DIR`).
const LOG_DIR: &str = "/app/logs";

/// The per-container sysctls from upstream's troubleshooting notes (SPEC §5).
const SYSCTLS: [(&str, &str); 4] = [
    ("net.ipv4.tcp_max_syn_backlog", "2048"),
    ("net.ipv4.tcp_fin_timeout", "30"),
    ("net.ipv4.ip_local_port_range", "1024 61000"),
    ("net.ipv4.tcp_abort_on_overflow", "1"),
];

/// SPEC §5's network-emulation profile, as the sidecars' environment defaults.
const NETEM_PROFILE: [(&str, &str); 9] = [
    ("NETEM_RATE", "5mbit"),
    ("NETEM_BURST", "18kb"),
    ("NETEM_TBF_LATENCY", "30ms"),
    ("NETEM_DELAY", "30ms"),
    ("NETEM_JITTER", "3ms"),
    ("NETEM_DISTRIBUTION", "normal"),
    ("NETEM_LOSS", "0.01%"),
    ("NETEM_LOSS_CORRELATION", "25%"),
    ("NETEM_INGRESS_RATE", "100mbit"),
];

// ---------------------------------------------------------------------------------------
// The compose model (only what is checked; the rest is ignored)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    #[serde(default)]
    volumes: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Service {
    build: Option<Build>,
    image: Option<String>,
    command: Vec<String>,
    entrypoint: Vec<String>,
    environment: BTreeMap<String, String>,
    ports: Vec<String>,
    volumes: Vec<String>,
    healthcheck: Option<Healthcheck>,
    restart: Option<String>,
    depends_on: BTreeMap<String, DependsOn>,
    sysctls: BTreeMap<String, String>,
    network_mode: Option<String>,
    cap_add: Vec<String>,
    /// Started only with `--profile NAME` (the `monitoring` services).
    profiles: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Build {
    Context(String),
    Full {
        context: String,
        #[serde(default)]
        dockerfile: Option<String>,
        #[serde(default)]
        target: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct Healthcheck {
    test: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct DependsOn {
    #[serde(default)]
    condition: Option<String>,
}

impl Service {
    fn env(&self) -> HashMap<String, String> {
        self.environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `(host, container)` of each published TCP port (`[IP:]HOST:CONTAINER[/tcp]`).
    fn published(&self) -> Vec<Option<(u16, u16)>> {
        self.ports
            .iter()
            .map(|p| {
                let p = p.strip_suffix("/tcp").unwrap_or(p);
                let mut parts = p.rsplit(':');
                let container = parts.next()?.parse().ok()?;
                let host = parts.next()?.parse().ok()?;
                Some((host, container))
            })
            .collect()
    }

    fn build_parts(&self) -> Option<(String, Option<String>, Option<String>)> {
        self.build.as_ref().map(|b| match b {
            Build::Context(context) => (context.clone(), None, None),
            Build::Full {
                context,
                dockerfile,
                target,
            } => (context.clone(), dockerfile.clone(), target.clone()),
        })
    }
}

/// Reads `files` as `docker compose -f A -f B` would merge them (services added or
/// replaced whole: the override files here only add services).
fn load(files: &[&str]) -> Compose {
    let mut merged: Option<Compose> = None;
    for file in files {
        let compose = parse(
            &std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("{file}: {e}")),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        match &mut merged {
            None => merged = Some(compose),
            Some(m) => {
                m.services.extend(compose.services);
                m.volumes.extend(compose.volumes);
            }
        }
    }
    merged.expect("at least one file")
}

fn parse(text: &str) -> Result<Compose, String> {
    let mut value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    resolve(&mut value, "")?;
    serde_json::from_value(value).map_err(|e| format!("unexpected compose shape: {e}"))
}

/// Interpolates every string value and turns numbers and booleans into strings, as
/// compose does for environment values and sysctls.
fn resolve(value: &mut serde_json::Value, at: &str) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::String(s) => *s = interpolate(s).map_err(|e| format!("{at}: {e}"))?,
        Value::Number(n) => *value = Value::String(n.to_string()),
        Value::Bool(b) => *value = Value::String(b.to_string()),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve(item, &format!("{at}[{i}]"))?;
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                resolve(v, &format!("{at}.{k}"))?;
            }
        }
        Value::Null => {}
    }
    Ok(())
}

/// Compose interpolation with no variables set: `${VAR:-default}` and `${VAR-default}`
/// give the default, `$$` is a `$`; anything without a default is an error.
fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let expr = &braced[..end];
            let default = expr
                .split_once(":-")
                .or_else(|| expr.split_once('-'))
                .map(|(_, d)| d)
                .ok_or_else(|| {
                    format!("${{{expr}}} has no default; the files must work with no variables set")
                })?;
            out.push_str(default);
            rest = &braced[end + 1..];
        } else {
            return Err(format!(
                "bare $ in {s:?}: write $$ for a literal $, or ${{VAR:-default}}"
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// What the repository provides: Dockerfile stages and binaries
// ---------------------------------------------------------------------------------------

/// The Dockerfile's stage names and the binaries its build stage installs.
struct Dockerfile {
    stages: BTreeSet<String>,
    binaries: BTreeSet<String>,
}

fn dockerfile(path: &Path) -> Result<Dockerfile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let stages = text
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("AS"))?;
            words.get(at + 1).map(|s| (*s).to_owned())
        })
        .collect();
    let binaries = text
        .lines()
        .find_map(|l| l.split_once("for bin in ").map(|(_, r)| r))
        .and_then(|r| r.split_once(';').map(|(list, _)| list))
        .map(|list| list.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(Dockerfile { stages, binaries })
}

/// The topology as `lps up` runs it with the compose ports, Mosquitto as the NG broker.
fn expected(topology: Topology) -> Vec<ServiceSpec> {
    let broker = Broker::Mosquitto {
        config: PathBuf::from(MOSQUITTO_CONF),
    };
    topology::services(
        topology,
        &Options {
            // docker-compose-ng.yml runs the edge, as `lps up ng --edge`.
            edge: topology == Topology::Ng,
            ..Options::default()
        },
        (topology == Topology::Ng).then_some(&broker),
    )
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// What a service is configured to do, read with its own configuration parser.
#[derive(Default)]
struct Wiring {
    /// The port it binds inside the container.
    bind: u16,
    /// The port `<binary> healthcheck` probes (its HTTP_PORT, default 8080).
    probed: u16,
    /// `(host, port)` of every HTTP target.
    targets: Vec<(String, u16)>,
    /// `(host, port)` of its broker.
    broker: Option<(String, u16)>,
    /// The topic it publishes to.
    topic: Option<String>,
    /// The filters it subscribes to.
    filters: Vec<String>,
    /// The port of its forward proxy (lps-edge), published as well.
    proxy: Option<u16>,
}

fn wiring(program: Program, service: &Service) -> Result<Wiring, String> {
    let env = service.env();
    let err = |e: lps_common::config::ConfigError| format!("its binary rejects the env: {e}");
    let targets = |u: &UpstreamConfig| {
        upstream_targets(u)
            .into_iter()
            .map(|(host, port, _)| (host, port))
            .collect()
    };
    let probed =
        lps_common::config::ServerConfig::from_env(&lps_common::config::Env::new(&env), 8080)
            .map_err(err)?
            .port;
    let mut w = Wiring {
        probed,
        ..Wiring::default()
    };
    match program {
        Program::ArsComp1 => {
            let c = ars_comp_1::Config::from_lookup(&env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, targets(&c.upstream));
        }
        Program::ArsComp2 => {
            let c = ars_comp_2::Config::from_lookup(&env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, targets(&c.upstream));
        }
        Program::LegacyProxy1 => {
            let c = legacy_proxy_1::Config::from_lookup(&env).map_err(err)?;
            w.bind = c.server.port;
            w.broker = Some((c.mqtt.host, c.mqtt.port));
            w.topic = Some(c.topic);
        }
        Program::LegacyProxy2 => {
            let c = legacy_proxy_2::Config::from_lookup(&env).map_err(err)?;
            (w.bind, w.targets) = (c.server.port, targets(&c.upstream));
            w.broker = Some((c.mqtt.host, c.mqtt.port));
            w.filters = lps_common::wire::bridge_filters(&c.group).into();
        }
        Program::RastSimulator => {
            let mut args = vec!["rast-simulator".to_owned()];
            args.extend(service.command.iter().skip(1).cloned());
            if let Some(model) = env.get(ENV_SIM_MODEL) {
                args.extend(["--model".to_owned(), model.clone()]);
            }
            let args = rast_simulator::Args::try_parse_from(&args)
                .map_err(|e| format!("rast-simulator rejects {args:?}: {e}"))?;
            let c = rast_simulator::Config::new(&env, &args).map_err(err)?;
            w.bind = c.server.port;
            if c.journal_dir != Path::new(LOG_DIR) {
                return Err(format!(
                    "the simulator's ledger goes to {}, not {LOG_DIR}",
                    c.journal_dir.display()
                ));
            }
        }
        Program::LpsEdge => {
            let c = lps_edge::Config::from_lookup(&env).map_err(err)?;
            w.bind = c.server.port;
            w.broker = c.ws.map(|ws| (ws.broker_host, ws.broker_port));
            w.proxy = c.proxy.map(|p| p.addr.port());
        }
        Program::Mosquitto | Program::EmbeddedBroker => w.bind = mosquitto_listener(),
        // `lps up --netem` only: compose shapes with tc sidecars (docker-compose-netem.yml).
        Program::LpsNetem => return Err("lps-netem is not a compose service".to_owned()),
    }
    Ok(w)
}

/// Every problem of the base compose file `compose` against `topology`.
fn check_topology(topology: Topology, compose: &Compose) -> Vec<String> {
    let mut problems = Vec::new();
    let specs = expected(topology);
    let want: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    // Services of a profile (monitoring) are extras, not part of the topology.
    let have: BTreeSet<&str> = compose
        .services
        .iter()
        .filter(|(_, s)| s.profiles.is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    for name in want.difference(&have) {
        problems.push(format!(
            "{name}: in the topology, missing from the compose file"
        ));
    }
    for name in have.difference(&want) {
        problems.push(format!("{name}: in the compose file, not in the topology"));
    }
    let image = match dockerfile(&repo().join("Dockerfile")) {
        Ok(image) => image,
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };

    // What each present service is wired to, from its own configuration parser.
    let mut wirings: HashMap<&str, Wiring> = HashMap::new();
    for spec in &specs {
        let Some(service) = compose.services.get(&spec.name) else {
            continue;
        };
        match wiring(spec.program, service) {
            Ok(w) => {
                wirings.insert(&spec.name, w);
            }
            Err(e) => problems.push(format!("{}: {e}", spec.name)),
        }
    }
    let bind_of = |name: &str| wirings.get(name).map(|w| w.bind);
    // Topology port → (compose host name, container port): how a 127.0.0.1 address of
    // the local topology reads in compose.
    let by_port: HashMap<u16, (&str, Option<u16>)> = specs
        .iter()
        .map(|s| (s.port, (s.name.as_str(), bind_of(&s.name))))
        .collect();
    let broker_name = specs
        .iter()
        .find(|s| matches!(s.program, Program::Mosquitto | Program::EmbeddedBroker))
        .map(|s| s.name.as_str());

    let mut host_ports: BTreeMap<u16, &str> = BTreeMap::new();
    for spec in &specs {
        let name = spec.name.as_str();
        let Some(service) = compose.services.get(name) else {
            continue;
        };
        let mut problem = |p: String| problems.push(format!("{name}: {p}"));
        let ours = !matches!(spec.program, Program::Mosquitto);

        // What runs.
        if ours {
            let want: Vec<&str> = std::iter::once(spec.program.name())
                .chain(spec.args.iter().map(String::as_str))
                .collect();
            if service.command != want {
                problem(format!("command {:?}, want {want:?}", service.command));
            }
            if !image.binaries.contains(spec.program.name()) {
                problem(format!(
                    "runs {}, which the Dockerfile does not install",
                    spec.program.name()
                ));
            }
        } else if !service
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("eclipse-mosquitto:2."))
        {
            problem(format!(
                "image {:?}, want eclipse-mosquitto:2.x",
                service.image
            ));
        }

        // Ports: published on the topology's port, onto the one the service binds.
        let wiring = wirings.get(name);
        let mut published = service.published();
        // The edge also publishes its proxy port, on the same host port (PROXY_PORT).
        if let Some(proxy) = wiring.and_then(|w| w.proxy) {
            let before = published.len();
            published.retain(|p| *p != Some((proxy, proxy)));
            if published.len() == before {
                problem(format!(
                    "proxy port {proxy} (PROXY_PORT) not published as \"{proxy}:{proxy}\""
                ));
            }
        }
        match published.as_slice() {
            [Some((host, container))] => {
                if *host != spec.port {
                    problem(format!(
                        "published on {host}, the topology uses {}",
                        spec.port
                    ));
                }
                if let Some(w) = wiring.filter(|w| w.bind != *container) {
                    problem(format!(
                        "publishes container port {container} but binds {}",
                        w.bind
                    ));
                }
                if let Some(other) = host_ports.insert(*host, name) {
                    problem(format!("host port {host} also published by {other}"));
                }
            }
            _ => problem(format!(
                "ports {:?}, want exactly \"{}:<container port>\"",
                service.ports, spec.port
            )),
        }

        // Environment: what the topology sets, with compose hosts and container ports.
        if ours {
            for (key, want) in [(ENV_SERVICE_NAME, name), (ENV_LOG_DIR, LOG_DIR)] {
                if service.environment.get(key).map(String::as_str) != Some(want) {
                    problem(format!(
                        "{key}={:?}, want {want:?}",
                        service.environment.get(key)
                    ));
                }
            }
        }
        for (key, value) in &spec.env {
            if key == ENV_TOKIO_WORKER_THREADS {
                // Not wiring: the local topology's share of this machine's cores per
                // replica. Containers take Tokio's default (README, settings).
                continue;
            }
            let want = equivalent(key, value, &by_port, broker_name);
            match service.environment.get(key) {
                None => problem(format!("{key} missing (topology: {value})")),
                Some(got) if Some(got) != want.as_ref() => problem(format!(
                    "{key}={got}, want {} (topology: {value})",
                    want.as_deref().unwrap_or("<no compose equivalent>")
                )),
                Some(_) => {}
            }
        }

        // Wiring resolves: targets and broker are services of this file, on the port
        // they bind, and start first.
        if let Some(w) = wiring {
            let mut peers: Vec<(&str, &(String, u16))> =
                w.targets.iter().map(|t| (ENV_TARGET_URL, t)).collect();
            peers.extend(w.broker.iter().map(|b| (ENV_MQTT_HOST, b)));
            for (what, (host, port)) in peers {
                match bind_of(host) {
                    None => problem(format!("{what} names {host}, not a service of this file")),
                    Some(bind) if bind != *port => problem(format!(
                        "{what} uses {host}:{port}, but {host} binds {bind}"
                    )),
                    Some(_) => {}
                }
                let healthy = service
                    .depends_on
                    .get(host)
                    .and_then(|d| d.condition.as_deref())
                    == Some("service_healthy");
                if !healthy {
                    problem(format!(
                        "{what} names {host}, but it does not wait for {host} (depends_on \
                         condition: service_healthy)"
                    ));
                }
            }
        }
        for (dep, how) in &service.depends_on {
            if !compose.services.contains_key(dep) {
                problem(format!("depends on {dep}, which does not exist"));
            }
            if how.condition.as_deref() != Some("service_healthy") {
                problem(format!(
                    "depends on {dep} without condition: service_healthy"
                ));
            }
        }

        // Health check: no shell; ours probe themselves on the path the topology waits for.
        match service.healthcheck.as_ref().map(|h| h.test.as_slice()) {
            None | Some([]) => problem("no healthcheck".into()),
            Some([first, ..]) if first != "CMD" => {
                problem(format!(
                    "healthcheck starts with {first:?}; use CMD (no shell)"
                ));
            }
            Some(test) => match spec.health {
                Health::Http(path) => {
                    let probe_path = test.get(3).map_or(HEALTHCHECK_PATH, String::as_str);
                    let binary = test.get(1).map(String::as_str).unwrap_or_default();
                    if test.get(2).map(String::as_str) != Some("healthcheck") || test.len() > 4 {
                        problem(format!(
                            "healthcheck {test:?}, want [CMD, <binary>, healthcheck, <path>]"
                        ));
                    } else if !image.binaries.contains(binary) {
                        problem(format!("healthcheck runs {binary}, not in the image"));
                    } else if probe_path != path {
                        problem(format!(
                            "healthcheck probes {probe_path}, the topology waits for {path}"
                        ));
                    }
                    if let Some(w) = wiring.filter(|w| w.probed != w.bind) {
                        problem(format!(
                            "healthcheck probes port {} (HTTP_PORT) but the service binds {}",
                            w.probed, w.bind
                        ));
                    }
                }
                Health::Tcp => {}
            },
        }
        if !matches!(
            service.restart.as_deref(),
            Some("always" | "unless-stopped" | "on-failure")
        ) {
            problem(format!("restart {:?}: no restart policy", service.restart));
        }

        // Container settings of the LPS services.
        if ours {
            for (key, want) in SYSCTLS {
                if service.sysctls.get(key).map(String::as_str) != Some(want) {
                    problem(format!(
                        "sysctl {key}={:?}, want {want}",
                        service.sysctls.get(key)
                    ));
                }
            }
            if !service
                .volumes
                .iter()
                .any(|v| v.split(':').nth(1) == Some(LOG_DIR))
            {
                problem(format!(
                    "no volume on {LOG_DIR}: logs would stay in the container"
                ));
            }
        }
    }

    // MQTT: every publisher's topic reaches every subscriber of the one shared group.
    let subscribers: Vec<(&str, &Wiring)> = wirings
        .iter()
        .filter(|(_, w)| !w.filters.is_empty())
        .map(|(n, w)| (*n, w))
        .collect();
    for (publisher, w) in &wirings {
        let Some(topic) = &w.topic else { continue };
        for (subscriber, s) in &subscribers {
            let covered = s.filters.iter().any(|f| {
                let plain = f
                    .strip_prefix("$share/")
                    .and_then(|f| f.split_once('/'))
                    .map_or(f.as_str(), |(_, f)| f);
                topic_matches(plain, topic)
            });
            if !covered {
                problems.push(format!(
                    "{publisher}: publishes to {topic}, which {subscriber}'s {:?} does not cover",
                    s.filters
                ));
            }
        }
    }
    let groups: BTreeSet<&str> = subscribers
        .iter()
        .flat_map(|(_, w)| w.filters.iter().map(|f| f.split('/').nth(1).unwrap_or(f)))
        .collect();
    if groups.len() > 1 {
        problems.push(format!(
            "legacy-proxy-2 instances in different share groups {groups:?}: each would get every message"
        ));
    }
    problems.extend(check_references(compose));
    problems
}

/// How a topology environment value reads in compose: `127.0.0.1:<topology port>` of a
/// service becomes `<service>:<container port>`, the broker's address its service name.
fn equivalent(
    key: &str,
    value: &str,
    by_port: &HashMap<u16, (&str, Option<u16>)>,
    broker: Option<&str>,
) -> Option<String> {
    if let Ok(url) = reqwest::Url::parse(value)
        && url.host_str() == Some("127.0.0.1")
    {
        let (name, bind) = by_port.get(&url.port()?)?;
        return Some(format!(
            "{}://{name}:{}{}",
            url.scheme(),
            (*bind)?,
            url.path()
        ));
    }
    match key {
        ENV_MQTT_HOST | ENV_MQTT_BROKER if value == "127.0.0.1" => broker.map(str::to_owned),
        ENV_MQTT_PORT => {
            let (_, bind) = by_port.get(&value.parse().ok()?)?;
            bind.map(|b| b.to_string())
        }
        _ => Some(value.to_owned()),
    }
}

/// Builds, images and bind mounts resolve.
fn check_references(compose: &Compose) -> Vec<String> {
    let mut problems = Vec::new();
    let built: BTreeSet<&str> = compose
        .services
        .values()
        .filter(|s| s.build.is_some())
        .filter_map(|s| s.image.as_deref())
        .collect();
    for (name, service) in &compose.services {
        let mut problem = |p: String| problems.push(format!("{name}: {p}"));
        if let Some((context, file, target)) = service.build_parts() {
            let path = repo()
                .join(&context)
                .join(file.as_deref().unwrap_or("Dockerfile"));
            match dockerfile(&path) {
                Err(e) => problem(format!("build: {e}")),
                Ok(d) => {
                    if let Some(t) = target.filter(|t| !d.stages.contains(t)) {
                        problem(format!(
                            "build target {t} is not a stage of {}",
                            path.display()
                        ));
                    }
                }
            }
            if service.image.is_none() {
                problem("builds without an image name: the other services cannot reuse it".into());
            }
        } else {
            match service.image.as_deref() {
                None => problem("neither build nor image".into()),
                Some(i) if built.contains(i) => {}
                Some(i) if i.rsplit_once(':').is_none_or(|(_, tag)| tag == "latest") => {
                    problem(format!(
                        "image {i} is built by no service here and has no pinned tag"
                    ));
                }
                Some(_) => {}
            }
        }
        for volume in &service.volumes {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with("./") && source != "./logs" {
                if !repo().join(source).exists() {
                    problem(format!("bind mount {source} does not exist"));
                }
            } else if !source.starts_with('.')
                && !source.starts_with('/')
                && !compose.volumes.contains_key(source)
            {
                problem(format!("named volume {source} is not declared"));
            }
        }
    }
    problems
}

/// Every problem of a network-emulation override `overlay` for the base file `base`.
fn check_netem(base: &Compose, overlay: &Compose) -> Vec<String> {
    let mut problems = Vec::new();
    let shaped: BTreeSet<&str> = base
        .services
        .iter()
        .filter(|(_, s)| {
            s.command.first().is_some_and(|c| {
                [
                    "ars-comp-1",
                    "ars-comp-2",
                    "legacy-proxy-1",
                    "legacy-proxy-2",
                ]
                .contains(&c.as_str())
            })
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let mut covered = BTreeSet::new();
    for (name, sidecar) in &overlay.services {
        let mut problem = |p: String| problems.push(format!("{name}: {p}"));
        if base.services.contains_key(name) {
            problem("replaces a service of the base file".into());
            continue;
        }
        match sidecar
            .network_mode
            .as_deref()
            .and_then(|m| m.strip_prefix("service:"))
        {
            Some(target) if shaped.contains(target) => {
                covered.insert(target.to_owned());
            }
            other => problem(format!(
                "network_mode {other:?} does not join a proxy of the base file"
            )),
        }
        if !sidecar.cap_add.iter().any(|c| c == "NET_ADMIN") {
            problem("without NET_ADMIN tc cannot shape".into());
        }
        if sidecar.restart.is_none() {
            problem("no restart policy: rules are not re-applied after a restart".into());
        }
        for (key, want) in NETEM_PROFILE {
            if sidecar.environment.get(key).map(String::as_str) != Some(want) {
                problem(format!(
                    "{key}={:?}, SPEC §5's profile is {want}",
                    sidecar.environment.get(key)
                ));
            }
        }
        let script = sidecar.entrypoint.join(" ");
        for needle in ["tbf", "netem", "ingress", "police"]
            .into_iter()
            .chain(NETEM_PROFILE.iter().map(|(k, _)| *k))
        {
            if !script.contains(needle) {
                problem(format!("its script does not use {needle}"));
            }
        }
    }
    for missing in shaped.iter().filter(|s| !covered.contains(**s)) {
        problems.push(format!("{missing}: no netem sidecar"));
    }
    let mut merged = base.clone();
    merged.services.extend(overlay.services.clone());
    problems.extend(check_references(&merged));
    problems
}

fn assert_clean(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn legacy_compose_matches_the_topology() {
    assert_clean(LEGACY, &check_topology(Topology::Legacy, &load(&[LEGACY])));
}

#[test]
fn ng_compose_matches_the_topology() {
    assert_clean(NG, &check_topology(Topology::Ng, &load(&[NG])));
}

#[test]
fn netem_overrides_shape_every_proxy_with_the_spec_profile() {
    assert_clean(NG_NETEM, &check_netem(&load(&[NG]), &load(&[NG_NETEM])));
    assert_clean(
        LEGACY_NETEM,
        &check_netem(&load(&[LEGACY]), &load(&[LEGACY_NETEM])),
    );
}

/// The checks above can fail: each deliberate miswiring is reported, naming the service.
#[test]
fn checks_catch_miswiring() {
    let ng = load(&[NG]);
    let broken = |edit: fn(&mut Compose)| {
        let mut compose = ng.clone();
        edit(&mut compose);
        check_topology(Topology::Ng, &compose)
    };
    fn service<'a>(c: &'a mut Compose, name: &str) -> &'a mut Service {
        c.services.get_mut(name).expect("service")
    }
    type Edit = fn(&mut Compose);
    let cases: [(&str, &str, Edit); 9] = [
        ("wrong host port", "proxy2-1", |c| {
            service(c, "proxy2-1").ports = vec!["9099:8080".into()]
        }),
        ("duplicate host port", "ars-comp-1-2", |c| {
            service(c, "ars-comp-1-2").ports = vec!["7081:8080".into()]
        }),
        ("target crosses replicas", "ars-comp-1-2", |c| {
            service(c, "ars-comp-1-2").environment.insert(
                ENV_TARGET_URL.into(),
                "http://proxy1-3:8080/ID_REQ_KC_STORE7D3BPACKET".into(),
            );
        }),
        ("target on the host port", "proxy2-3", |c| {
            service(c, "proxy2-3").environment.insert(
                ENV_TARGET_URL.into(),
                "http://ars-comp-2-3:9083/ID_REQ_KC_STORE7D3BPACKET".into(),
            );
        }),
        ("topic no subscriber covers", "proxy1-1", |c| {
            service(c, "proxy1-1")
                .environment
                .insert(ENV_MQTT_TOPIC.into(), "proxy1/msg".into());
        }),
        ("no healthcheck", "ars-comp-3", |c| {
            service(c, "ars-comp-3").healthcheck = None
        }),
        ("no restart", "mosquitto", |c| {
            service(c, "mosquitto").restart = None
        }),
        ("not waiting for its target", "ars-comp-2-1", |c| {
            service(c, "ars-comp-2-1").depends_on.clear()
        }),
        ("simulator probed on the wrong port", "ars-comp-3", |c| {
            service(c, "ars-comp-3").environment.remove(ENV_HTTP_PORT);
        }),
    ];
    for (what, name, edit) in &cases {
        let problems = broken(*edit);
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{name}: "))),
            "{what}: not caught for {name}; problems: {problems:?}"
        );
    }
    let mut overlay = load(&[NG_NETEM]);
    overlay.services.remove("netem-proxy1-2");
    overlay
        .services
        .get_mut("netem-proxy2-1")
        .expect("sidecar")
        .environment
        .insert("NETEM_DELAY".into(), "3ms".into());
    let problems = check_netem(&ng, &overlay);
    for name in ["proxy1-2", "netem-proxy2-1"] {
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{name}: "))),
            "{name} not caught: {problems:?}"
        );
    }
}

#[test]
fn interpolation_follows_compose() {
    assert_eq!(
        interpolate("${LPS_LOGS:-./logs}:/app/logs").unwrap(),
        "./logs:/app/logs"
    );
    assert_eq!(interpolate("${A-x}/$$SYS").unwrap(), "x/$SYS");
    assert!(interpolate("${LPS_UID}").is_err());
    assert!(interpolate("$HOME").is_err());
    assert!(topic_matches("+/message", "proxy3/message"));
    assert!(!topic_matches("+/message", "proxy3/retry/message"));
    assert!(topic_matches("+/retry/message", "proxy2-1/retry/message"));
}

/// The docker-compose command: Debian's `docker-compose` (v1), else the `docker compose`
/// plugin.
fn docker_compose() -> Result<Vec<&'static str>, String> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    [vec!["docker-compose"], vec!["docker", "compose"]]
        .into_iter()
        .find(|cmd| works(cmd))
        .ok_or_else(|| {
            "docker-compose is not installed (nor the `docker compose` plugin): the compose \
             tests need it to validate the files; on Debian/Ubuntu: apt-get install -y \
             docker-compose"
                .to_owned()
        })
}

#[test]
fn docker_compose_accepts_the_files() {
    let compose = docker_compose().unwrap_or_else(|e| panic!("{e}"));
    for files in [
        &[LEGACY][..],
        &[NG],
        &[NG, NG_NETEM],
        &[LEGACY, LEGACY_NETEM],
    ] {
        let mut cmd = Command::new(compose[0]);
        cmd.args(&compose[1..]).current_dir(repo());
        for file in files {
            cmd.args(["-f", file]);
        }
        let output = cmd
            .args(["config", "-q"])
            .output()
            .unwrap_or_else(|e| panic!("running {compose:?}: {e}"));
        assert!(
            output.status.success(),
            "{compose:?} config rejects {files:?}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// On a kernel without `sch_netem` (the machines this project is tested on), a run with a
/// netem override is refused before anything starts, by `lps experiment` and by
/// `Automations/run_experiment.sh --netem`, saying why. Elsewhere the refusal does not
/// apply (and running the override needs an engine): the test says so and passes.
#[test]
fn netem_runs_are_refused_up_front_without_sch_netem() {
    // The probe lps and Automations/common.sh make: a throwaway network namespace.
    let mut probe = Command::new("unshare");
    if !nix::unistd::geteuid().is_root() {
        probe.args(["--user", "--map-root-user"]);
    }
    let probe = probe
        .args([
            "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .output()
        .expect("unshare (util-linux) runs");
    let said = String::from_utf8_lossy(&probe.stderr);
    if probe.status.success() || !said.contains("qdisc kind is unknown") {
        eprintln!(
            "skipped: this kernel has sch_netem, or the probe cannot tell ({}): the refusal \
             is for kernels without it",
            said.trim()
        );
        return;
    }
    let compose = docker_compose().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lps"))
        .current_dir(repo())
        .args(["experiment", "ng", "--compose", NG, "--compose", NG_NETEM])
        .args(["--duration", "5", "--out"])
        .arg(dir.path().join("run"))
        .env("LPS_COMPOSE", compose.join(" "))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "asks for network emulation, which this machine cannot do: this kernel has no sch_netem"
        ),
        "{stderr}"
    );
    // Refused before `up`: no compose command that starts anything ran.
    assert!(!stderr.contains(" up -d"), "{stderr}");

    let output = Command::new("bash")
        .arg(repo().join("Automations/run_experiment.sh"))
        .args(["--compose", "--netem", "legacy", "failover", "--out"])
        .arg(dir.path().join("automations"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(
            "--netem: network emulation is not available here: this kernel has no sch_netem"
        ),
        "{stderr}"
    );
    assert!(!dir.path().join("automations").exists());
}
