//! The simulator in-process: model-0 delays, capacity model, journal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use lps_common::config::ENV_LOG_DIR;
use lps_common::wire::STORE_PATH;
use lps_testkit::{TestServer, eventually, h2c_client, http1_client};
use rast_simulator::journal::{self, LedgerRecord};
use rast_simulator::model::{self, Model};
use rast_simulator::{Args, Config, Simulator};
use tempfile::TempDir;

struct Sim {
    sim: Arc<Simulator>,
    server: TestServer,
    dir: TempDir,
}

impl Sim {
    /// The simulator of `model` with its journal in a temporary folder, served the way
    /// [`rast_simulator::serve`] serves it, keeping a handle on its load.
    async fn start(model: Model) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = HashMap::from([(ENV_LOG_DIR, dir.path().to_str().unwrap())]);
        let args = Args {
            model: "zero".to_owned(),
            corr_max: 0,
            workers: 4,
            service_ms: 35.0,
        };
        let mut config = Config::new(&env, &args).unwrap();
        config.model = model;
        let (sim, writer) = Simulator::open(&config).unwrap();
        let server = TestServer::serve(|listener, shutdown| {
            let sim = sim.clone();
            async move { sim.serve(writer, &config.server, listener, shutdown).await }
        })
        .await;
        Self { sim, server, dir }
    }

    async fn post(&self, command: &str, id: Option<&str>) -> reqwest::Response {
        let mut request = http1_client()
            .post(self.server.url(&format!("/{command}")))
            .body(r#"{"id":"1","body":"x"}"#);
        if let Some(id) = id {
            request = request.header("Request-Id", id);
        }
        request.send().await.unwrap()
    }

    async fn ledger(&self, count: usize) -> Vec<LedgerRecord> {
        let path = self.dir.path().join(journal::LEDGER_FILE);
        eventually(
            &format!("{count} ledger records"),
            Duration::from_secs(10),
            || {
                let path = path.clone();
                async move {
                    journal::read_ledger(&path)
                        .ok()
                        .filter(|l| l.len() >= count)
                }
            },
        )
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(journal::LOG_FILE)).unwrap()
    }
}

fn seconds(response: &reqwest::Response, header: &str) -> f64 {
    response.headers()[header]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn model_0_delay_follows_requests_in_progress() {
    let sim = Sim::start(Model::Regression0 { corr_max: 0 }).await;
    for pr1 in 0..=4u64 {
        // Hold `pr1` requests in progress; none finishes, so PR3 stays 0.
        let held: Vec<_> = (0..pr1).map(|_| sim.sim.load().arrive()).collect();
        let response = sim
            .post("ID_REQ_KC_STORE7D3BPACKET", Some(&pr1.to_string()))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let predicted = seconds(&response, "x-pred-process-time");
        let expected = model::regression0(pr1, 0, 9);
        assert!(
            (predicted - expected).abs() < 1e-5,
            "PR1={pr1}: predicted {predicted}, model {expected}"
        );
        let took = seconds(&response, "x-process-time");
        assert!(
            took >= expected - 0.001,
            "PR1={pr1}: answered after {took} s, before the predicted {expected} s"
        );
        assert!(
            took < expected + 0.1,
            "PR1={pr1}: answered after {took} s, predicted {expected} s"
        );
        assert_eq!(response.text().await.unwrap(), "Success");
        drop(held);
    }
    let ledger = sim.ledger(5).await;
    let pr1s: Vec<u64> = ledger.iter().map(|r| r.pr1).collect();
    assert_eq!(pr1s, vec![0, 1, 2, 3, 4]);
    assert_eq!(sim.sim.load().in_progress(), 0);
}

#[tokio::test]
async fn unknown_commands_are_404_and_duplicates_are_recorded_twice() {
    let sim = Sim::start(Model::Zero).await;
    let response = sim.post("ID_REQ_NOT_A_COMMAND", Some("1")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().await.unwrap(), "Command not found");
    for _ in 0..2 {
        assert_eq!(
            sim.post("ID_REQ_KC_STORE7D3BPACKET", Some("42"))
                .await
                .status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        sim.post("ID_REQ_KC_HEARTBEAT", None).await.status(),
        StatusCode::OK
    );
    let ledger = sim.ledger(4).await;
    assert_eq!(
        (ledger[0].status, ledger[0].cmd.as_str()),
        (404, "ID_REQ_NOT_A_COMMAND")
    );
    assert_eq!(
        ledger
            .iter()
            .filter(|r| r.uid == "42" && r.status == 200)
            .count(),
        2
    );
    let generated = &ledger[3].uid;
    assert!(
        uuid::Uuid::parse_str(generated).is_ok(),
        "a missing Request-Id becomes a UUID: {generated}"
    );
    let log = sim.log();
    assert_eq!(
        log.matches("UID: 42, CMD-START ID_REQ_KC_STORE7D3BPACKET")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("UID: 42, CMD-ENDE  ID_REQ_KC_STORE7D3BPACKET")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("200 OK: POST - /ID_REQ_KC_STORE7D3BPACKET")
            .count(),
        2,
        "{log}"
    );
}

#[tokio::test]
async fn speaks_http1_only() {
    let sim = Sim::start(Model::Zero).await;
    let h2 = h2c_client().post(sim.server.url(STORE_PATH)).send().await;
    assert!(h2.is_err(), "the legacy backend must not accept h2c");
}

#[tokio::test]
async fn the_worker_limit_queues_requests() {
    let sim = Arc::new(
        Sim::start(Model::Fixed {
            workers: 1,
            service: Duration::from_millis(150),
        })
        .await,
    );
    let (a, b) = tokio::join!(
        sim.post("ID_REQ_KC_STORE7D3BPACKET", Some("1")),
        sim.post("ID_REQ_KC_STORE7D3BPACKET", Some("2"))
    );
    let mut took = [seconds(&a, "x-process-time"), seconds(&b, "x-process-time")];
    took.sort_by(f64::total_cmp);
    assert!(took[0] >= 0.149, "{took:?}");
    assert!(
        took[1] >= 0.299,
        "the second request waited for the only worker: {took:?}"
    );
}

#[tokio::test]
async fn an_aborted_request_is_recorded_and_does_not_leak() {
    let sim = Sim::start(Model::Fixed {
        workers: 4,
        service: Duration::from_secs(5),
    })
    .await;
    let aborted = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap()
        .post(sim.server.url(STORE_PATH))
        .header("Request-Id", "7")
        .send()
        .await;
    assert!(aborted.is_err());
    let ledger = sim.ledger(1).await;
    assert_eq!((ledger[0].uid.as_str(), ledger[0].status), ("7", 499));
    assert!(
        !sim.log().contains("CMD-ENDE"),
        "an aborted request never ended"
    );
    assert_eq!(sim.sim.load().in_progress(), 0);
}
