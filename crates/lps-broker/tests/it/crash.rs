//! A SIGKILL of the broker process: what the embedded broker acknowledged to a publisher
//! (PUBCOMP) and had not yet delivered to a subscriber is in its storage, however long it
//! has been waiting. A session's undelivered messages are server state (§4.1) that a
//! restart with the same storage keeps; a SIGKILL (or a crash) only forgets what was not
//! yet written: the broker writes behind, every 250 ms, without fsync (the page cache
//! outlives a killed process, so a SIGKILL needs no fsync; a power cut would).
//!
//! The broker runs as a process of its own: this test binary started again with only
//! [`broker_process`] selected, so the SIGKILL hits a real process and nothing in it gets
//! to flush or clean up.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::wire::{Client, Connect, Packet, Prop, Publish};

/// Set in the environment of the broker process: its folder (`data/` holds the storage,
/// `port` its port once it listens).
const PROCESS_DIR: &str = "LPS_BROKER_PROCESS_DIR";
/// The bridges' Receive Maximum.
const WINDOW: u16 = 32;

/// Not a test: the broker process of [`BrokerProcess`], which runs this binary with only
/// this function and [`PROCESS_DIR`] set. It runs `lps_broker::Broker` (what `lps service
/// embedded-broker` runs) until killed; without the variable it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the broker process of the crash tests, started by them"]
async fn broker_process() {
    let Some(dir) = std::env::var_os(PROCESS_DIR).map(PathBuf::from) else {
        return;
    };
    let broker = lps_broker::Broker::start(([127, 0, 0, 1], 0).into(), dir.join("data"))
        .await
        .expect("start the embedded broker");
    let written = dir.join("port.new");
    std::fs::write(&written, broker.addr.port().to_string()).expect("write the port");
    std::fs::rename(&written, dir.join("port")).expect("publish the port");
    std::future::pending::<()>().await;
}

/// The embedded broker as a process, restarted on the same storage after a SIGKILL.
struct BrokerProcess {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl BrokerProcess {
    /// Starts it; returns it and its port.
    async fn start() -> (Self, u16) {
        let mut broker = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        let port = broker.launch().await;
        (broker, port)
    }

    /// Starts the process on the storage in its folder; returns its port.
    async fn launch(&mut self) -> u16 {
        let port_file = self.dir.path().join("port");
        let _ = std::fs::remove_file(&port_file);
        let exe = std::env::current_exe().expect("the test binary");
        let child = Command::new(exe)
            .args(["--exact", "crash::broker_process", "--ignored"])
            .env(PROCESS_DIR, self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the broker process");
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(port) = std::fs::read_to_string(&port_file) {
                return port.trim().parse().expect("a port");
            }
            let exited = child.try_wait().expect("the broker process");
            assert!(exited.is_none(), "the broker process exited: {exited:?}");
            assert!(
                Instant::now() < deadline,
                "the broker process never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and waits until the process is gone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL the broker process");
        }
    }
}

/// `$share` member with the bridges' settings: a session that outlives the connection,
/// Receive Maximum `WINDOW`.
fn member() -> Connect {
    Connect::new("member")
        .session_expiry(3600)
        .prop(Prop::ReceiveMaximum(WINDOW))
}

/// An online `$share` member holds its whole window unacknowledged (a bridge whose backend
/// is slow) while a publisher has 300 QoS 2 messages acknowledged: 32 are out to the member,
/// 268 wait in the broker. A second later the broker is SIGKILLed and started again on the
/// same storage: the member, resuming its session, gets all 300 (the 32 it held again),
/// in order, each once. The published mqtt5 0.49.0 lost the 268: they waited in the
/// connection's in-memory lane (`vendor/mqtt5/LPS-PATCH.md`, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_an_online_member_survives_a_sigkill() {
    const MESSAGES: usize = 300;
    let (mut broker, port) = BrokerProcess::start().await;
    let mut member_before = Client::connect(port, member()).await;
    member_before.subscribe("$share/bridges/crash/t", 2).await;
    let mut publisher = Client::plain(port, "publisher").await;
    let sent: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:03}")).collect();
    for text in &sent {
        let reason = publisher
            .publish(Publish::new("crash/t", text.as_str()).qos(2))
            .await;
        assert_eq!(reason, 0, "{text}");
    }
    let out: Vec<String> = member_before
        .take_unacked(WINDOW.into())
        .await
        .iter()
        .map(Publish::text)
        .collect();
    assert_eq!(out, sent[..WINDOW.into()], "the member's window");
    // Four times the broker's write-behind interval (250 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;

    broker.kill().await;
    drop((member_before, publisher));
    let port = broker.launch().await;

    let mut member = Client::connect(port, member().resume()).await;
    assert!(member.connack.session_present, "{:?}", member.connack);
    // Everything the broker sends until it has been quiet for two seconds, acknowledged.
    let mut got = Vec::new();
    while let Some(packet) = member.recv_within(Duration::from_secs(2)).await {
        match packet.expect("the connection open") {
            Packet::Publish(publish) => {
                member.ack(&publish).await;
                got.push(publish.text());
            }
            Packet::PubRel(id, _) => member.pubcomp(id).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    let lost = sent.iter().filter(|text| !got.contains(text)).count();
    assert_eq!(
        lost, 0,
        "{lost} of {MESSAGES} acknowledged messages lost with the broker"
    );
    assert_eq!(got, sent, "in order, each once");
}
