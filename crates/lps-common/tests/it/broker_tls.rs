//! Secure broker links against a real Mosquitto that takes only TLS and only a known user,
//! with certificates generated for the test: the right settings deliver (QoS 2, TLS,
//! password from a file), a wrong password or an unknown CA keeps the link down with a
//! clear log line, without retrying in a tight loop, and never logs the password.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lps_common::config::{
    ENV_MQTT_CA_FILE, ENV_MQTT_CLIENT_CERT_FILE, ENV_MQTT_CLIENT_KEY_FILE, ENV_MQTT_HOST,
    ENV_MQTT_PASSWORD, ENV_MQTT_PASSWORD_FILE, ENV_MQTT_PORT, ENV_MQTT_RECONNECT_MAX_MS,
    ENV_MQTT_RECONNECT_MIN_MS, ENV_MQTT_TLS, ENV_MQTT_USERNAME, ENV_SERVICE_NAME, Env,
};
use lps_common::mqtt::mqtt5::{Message, QoS, SubscribeOptions};
use lps_common::mqtt::{Completed, Link, MqttConfig};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::pki::TestPki;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const USER: &str = "lps-bridge";
const PASSWORD: &str = "correct horse battery staple";

fn config(pairs: &[(&str, String)]) -> MqttConfig {
    let env: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    MqttConfig::from_env(&Env::new(&env), "x").expect("valid broker settings")
}

fn base(broker: &Mosquitto, ca: &std::path::Path, client_id: &str) -> Vec<(&'static str, String)> {
    vec![
        (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
        (ENV_MQTT_PORT, broker.port.to_string()),
        (ENV_MQTT_TLS, "1".to_owned()),
        (ENV_MQTT_CA_FILE, ca.display().to_string()),
        (ENV_MQTT_USERNAME, USER.to_owned()),
        (ENV_SERVICE_NAME, client_id.to_owned()),
        (ENV_MQTT_RECONNECT_MIN_MS, "100".to_owned()),
        (ENV_MQTT_RECONNECT_MAX_MS, "500".to_owned()),
    ]
}

#[tokio::test]
async fn tls_and_password_deliver_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path(), "good");
    let broker = Mosquitto::start_secure(&pki, USER, PASSWORD).await;
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();

    // The subscriber has the password inline, the publisher in a file (as a secret mount).
    let mut sub_env = base(&broker, &pki.ca, "tls-sub");
    sub_env.push((ENV_MQTT_PASSWORD, PASSWORD.to_owned()));
    let sub = config(&sub_env);
    let mut pub_env = base(&broker, &pki.ca, "tls-pub");
    pub_env.push((ENV_MQTT_PASSWORD_FILE, password_file.display().to_string()));
    let publisher = config(&pub_env);
    assert_eq!(sub.address(), format!("mqtts://127.0.0.1:{}", broker.port));
    assert_eq!(
        sub.password, publisher.password,
        "one trailing newline dropped"
    );
    for cfg in [&sub, &publisher] {
        assert!(
            !format!("{cfg:?}").contains("horse"),
            "Debug shows the password"
        );
    }

    let shutdown = CancellationToken::new();
    let sub_link = Link::new(sub.clone(), sub.connect_options()).await.unwrap();
    connect_within(&sub_link, &shutdown).await;
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    sub_link
        .client
        .subscribe_with_options(
            "secure/test",
            SubscribeOptions {
                qos: QoS::ExactlyOnce,
                ..SubscribeOptions::default()
            },
            move |m: Message| {
                let _ = tx.send(m.payload.to_vec());
            },
        )
        .await
        .unwrap();
    let pub_link = Link::new(publisher.clone(), publisher.connect_options())
        .await
        .unwrap();
    connect_within(&pub_link, &shutdown).await;
    let sent = pub_link
        .publish(
            "secure/test",
            b"{\"request_id\":\"1\"}".to_vec(),
            QoS::ExactlyOnce,
            Vec::new(),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(sent, Ok(Completed::Direct));
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("delivered over TLS")
        .unwrap();
    assert_eq!(got, b"{\"request_id\":\"1\"}");
    pub_link.disconnect().await;
    sub_link.disconnect().await;
}

async fn connect_within(link: &Link, shutdown: &CancellationToken) {
    let connected = tokio::time::timeout(Duration::from_secs(10), link.connect(shutdown)).await;
    assert_eq!(connected, Ok(true), "not connected within 10 s");
}

/// Log lines written while `run` runs (current-thread runtime: every task logs here).
async fn captured<F: Future<Output = ()>>(run: F) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    run.await;
    String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned()
}

/// Runs a link with `settings` for two seconds; it must stay down. Returns our log lines
/// and how many times the broker saw it connect.
async fn stays_down(
    broker: &Mosquitto,
    mut settings: Vec<(&'static str, String)>,
) -> (String, usize) {
    // A short first delay and a long last one: backing off at once shows as few tries.
    settings.retain(|(k, _)| !k.starts_with("MQTT_RECONNECT_"));
    settings.push((ENV_MQTT_RECONNECT_MIN_MS, "50".to_owned()));
    settings.push((ENV_MQTT_RECONNECT_MAX_MS, "1000".to_owned()));
    let cfg = config(&settings);
    let before = broker.log().matches("New connection from").count();
    let logs = captured(async {
        let link = Link::new(cfg.clone(), cfg.connect_options()).await.unwrap();
        let shutdown = CancellationToken::new();
        let trying = {
            let link = link.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { link.connect(&shutdown).await })
        };
        assert!(
            !link.wait_connected(Duration::from_secs(2)).await,
            "connected with bad settings"
        );
        shutdown.cancel();
        assert!(!trying.await.unwrap(), "connect reported success");
        assert!(!link.is_connected());
    })
    .await;
    let attempts = broker.log().matches("New connection from").count() - before;
    (logs, attempts)
}

#[tokio::test]
async fn a_wrong_password_keeps_the_link_down_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path(), "good");
    let broker = Mosquitto::start_secure(&pki, USER, PASSWORD).await;
    let mut settings = base(&broker, &pki.ca, "tls-wrong-password");
    settings.push((ENV_MQTT_PASSWORD, "not the password".to_owned()));
    let (logs, attempts) = stays_down(&broker, settings).await;
    let refused: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("the broker refused the credentials"))
        .collect();
    assert!(!refused.is_empty(), "no clear log line:\n{logs}");
    assert!(refused[0].contains(USER), "{}", refused[0]);
    assert!(
        !logs.contains("not the password"),
        "password logged:\n{logs}"
    );
    // Straight to the longest delay (1 s) for 2 s: at most three tries (doubling from 50 ms
    // would make six).
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} connection attempts:\n{logs}"
    );
}

#[tokio::test]
async fn an_unknown_ca_keeps_the_link_down_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path(), "good");
    let other = TestPki::generate(dir.path(), "other");
    let broker = Mosquitto::start_secure(&pki, USER, PASSWORD).await;
    let mut settings = base(&broker, &other.ca, "tls-wrong-ca");
    settings.push((ENV_MQTT_PASSWORD, PASSWORD.to_owned()));
    let (logs, attempts) = stays_down(&broker, settings).await;
    let failed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("the TLS handshake failed"))
        .collect();
    assert!(!failed.is_empty(), "no clear log line:\n{logs}");
    assert!(
        failed[0].contains("UnknownIssuer") || failed[0].contains("certificate"),
        "{}",
        failed[0]
    );
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} connection attempts:\n{logs}"
    );
}

#[test]
fn bad_tls_and_password_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path(), "good");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![(ENV_MQTT_CA_FILE, "/nonexistent/ca.pem".into())],
            ENV_MQTT_CA_FILE,
        ),
        (vec![(ENV_MQTT_CA_FILE, path(&garbage))], ENV_MQTT_CA_FILE),
        (
            vec![
                (ENV_MQTT_CA_FILE, path(&pki.ca)),
                (ENV_MQTT_TLS, "0".into()),
            ],
            ENV_MQTT_TLS,
        ),
        (vec![(ENV_MQTT_TLS, "maybe".into())], ENV_MQTT_TLS),
        (
            vec![
                (ENV_MQTT_TLS, "1".into()),
                (ENV_MQTT_CLIENT_CERT_FILE, path(&pki.client_cert)),
            ],
            ENV_MQTT_CLIENT_KEY_FILE,
        ),
        (
            vec![
                (ENV_MQTT_CLIENT_CERT_FILE, path(&pki.client_cert)),
                (ENV_MQTT_CLIENT_KEY_FILE, path(&garbage)),
            ],
            ENV_MQTT_CLIENT_KEY_FILE,
        ),
        (vec![(ENV_MQTT_PASSWORD, "x".into())], ENV_MQTT_USERNAME),
        (
            vec![
                (ENV_MQTT_USERNAME, "u".into()),
                (ENV_MQTT_PASSWORD, "x".into()),
                (ENV_MQTT_PASSWORD_FILE, path(&garbage)),
            ],
            ENV_MQTT_PASSWORD_FILE,
        ),
        (
            vec![
                (ENV_MQTT_USERNAME, "u".into()),
                (ENV_MQTT_PASSWORD_FILE, "/nonexistent".into()),
            ],
            ENV_MQTT_PASSWORD_FILE,
        ),
    ];
    for (pairs, var) in cases {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let error =
            MqttConfig::from_env(&Env::new(&env), "x").expect_err(&format!("{pairs:?} accepted"));
        assert_eq!(error.var, var, "{pairs:?}: {error}");
        assert!(!error.to_string().contains('\n'), "{error}");
    }
    // A client certificate with its key is fine, and TLS moves the default port to 8883.
    let env: HashMap<&str, String> = [
        (ENV_MQTT_CLIENT_CERT_FILE, path(&pki.client_cert)),
        (ENV_MQTT_CLIENT_KEY_FILE, path(&pki.client_key)),
    ]
    .into();
    let env: HashMap<String, String> = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let cfg = MqttConfig::from_env(&Env::new(&env), "x").unwrap();
    assert_eq!(cfg.address(), "mqtts://localhost:8883");
    assert!(
        !format!("{cfg:?}").contains("PRIVATE KEY"),
        "Debug shows the key"
    );
}
