//! `lps dead-letters list|replay`: legacy-proxy-2's dead letters, retained on the broker
//! one topic each (`<prefix>/<key>`), listed or replayed through
//! [`lps_common::dead_letters`]. This module only connects, selects and prints.
//!
//! Environment: `MQTT_HOST` (alias `MQTT_BROKER`) and `MQTT_PORT` when `--broker` is not
//! given, `DEAD_LETTER_TOPIC` when `--prefix` is not given.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use lps_common::dead_letters::{self, DeadLetter};
use lps_common::mqtt::mqtt5::{ConnectOptions, MqttClient};
use lps_common::wire::DEAD_LETTER_TOPIC;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `lps dead-letters`.
#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    /// The broker as HOST:PORT (default: MQTT_HOST or MQTT_BROKER, and MQTT_PORT; else
    /// 127.0.0.1:1883).
    #[arg(long, global = true)]
    pub broker: Option<String>,
    /// The dead-letter topic prefix (legacy-proxy-2's DEAD_LETTER_TOPIC).
    #[arg(long, global = true, env = "DEAD_LETTER_TOPIC", default_value = DEAD_LETTER_TOPIC)]
    pub prefix: String,
    /// The listing is complete once no letter arrived for this many milliseconds.
    #[arg(long, global = true, default_value_t = 1000)]
    pub quiet_ms: u64,
    /// What to do with them.
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with the dead letters.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Print the dead letters and their count (changes nothing).
    ///
    /// One line per letter: key, time, reason, source topic, request id, size, detail.
    List {
        /// One JSON object per line (with the payload as text) instead; the count goes to
        /// stderr.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again to their source topics, then clear them.
    ///
    /// Each payload goes to the topic it came from with QoS 2 and no attempt count (a fresh
    /// start); its letter is cleared once the broker completed the handshake. Refused
    /// unless a legacy-proxy-2 answers the subscriber probe. All letters unless --key or
    /// --reason select some.
    Replay {
        /// Only this letter (repeatable).
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
        /// Only letters whose reason (`<reason>: <detail>`) starts with this, e.g. rejected.
        #[arg(long, value_name = "PREFIX")]
        reason: Option<String>,
    },
}

/// Runs `lps dead-letters`.
pub async fn run(args: DeadLettersArgs) -> anyhow::Result<()> {
    if args.prefix.is_empty() || !lps_common::mqtt::mqtt5::is_valid_topic_name(&args.prefix) {
        bail!(
            "--prefix {:?}: expected an MQTT topic name without wildcards, e.g. {DEAD_LETTER_TOPIC}",
            args.prefix
        );
    }
    let (host, port) = broker_address(args.broker.as_deref(), |key| std::env::var(key).ok())?;
    let client = connect(&host, port).await?;
    let quiet = Duration::from_millis(args.quiet_ms);
    let result = match args.action {
        Action::List { json } => list(&client, &args.prefix, quiet, json).await,
        Action::Replay { keys, reason } => {
            replay(&client, &args.prefix, quiet, &keys, reason.as_deref()).await
        }
    };
    let _ = client.disconnect().await;
    result
}

async fn list(
    client: &MqttClient,
    prefix: &str,
    quiet: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let letters = dead_letters::list(client, prefix, quiet)
        .await
        .context("listing the dead letters")?;
    for letter in &letters {
        if json {
            println!("{}", json_line(letter));
        } else {
            println!("{}", line(letter));
        }
    }
    let count = count_line(letters.len(), prefix);
    if json {
        eprintln!("{count}");
    } else {
        println!("{count}");
    }
    Ok(())
}

async fn replay(
    client: &MqttClient,
    prefix: &str,
    quiet: Duration,
    keys: &[String],
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let letters = dead_letters::list(client, prefix, quiet)
        .await
        .context("listing the dead letters")?;
    let selected = select(&letters, keys, reason, prefix)?;
    if selected.is_empty() {
        println!(
            "nothing to replay: {} selected",
            count_line(letters.len(), prefix)
        );
        return Ok(());
    }
    let report = dead_letters::replay(client, &selected, prefix).await?;
    for key in &report.replayed {
        if let Some(letter) = selected.iter().find(|l| &l.key == key) {
            println!(
                "replayed {key} to {} (request id {})",
                letter.source_topic.as_deref().unwrap_or("-"),
                letter.request_id.as_deref().unwrap_or("-")
            );
        }
    }
    for (key, why) in &report.skipped {
        eprintln!("skipped {key}: {why}");
    }
    println!(
        "replayed {} of {} selected dead letters{}",
        report.replayed.len(),
        selected.len(),
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(", skipped {}", report.skipped.len())
        }
    );
    if let Some(failure) = report.failed {
        let consequence = if failure.delivered {
            "its payload was delivered but the letter is still there: replaying it again \
             duplicates the message"
        } else {
            "its letter is unchanged"
        };
        bail!(
            "replay stopped at {}: {} ({consequence}); {} more not attempted, unchanged",
            failure.key,
            failure.error,
            report.not_attempted.len()
        );
    }
    Ok(())
}

/// The letters `keys` (all of which must exist) and `reason` (a prefix of
/// `<reason>: <detail>`) select; no filter selects all.
fn select(
    letters: &[DeadLetter],
    keys: &[String],
    reason: Option<&str>,
    prefix: &str,
) -> anyhow::Result<Vec<DeadLetter>> {
    if let Some(missing) = keys
        .iter()
        .find(|key| !letters.iter().any(|l| &l.key == *key))
    {
        bail!("no dead letter with key {missing} under {prefix} (see `lps dead-letters list`)");
    }
    Ok(letters
        .iter()
        .filter(|l| keys.is_empty() || keys.contains(&l.key))
        .filter(|l| reason.is_none_or(|r| l.reason_text().starts_with(r)))
        .cloned()
        .collect())
}

/// `HOST:PORT` from `--broker`, else from `MQTT_HOST`/`MQTT_BROKER` and `MQTT_PORT`, else
/// 127.0.0.1:1883.
fn broker_address(
    arg: Option<&str>,
    lookup: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<(String, u16)> {
    if let Some(arg) = arg {
        let text = arg.strip_prefix("mqtt://").unwrap_or(arg);
        let expected = || anyhow!("--broker {arg:?}: expected HOST:PORT, e.g. 127.0.0.1:1883");
        let (host, port) = text.rsplit_once(':').ok_or_else(expected)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse::<u16>().ok().filter(|&p| p > 0);
        return match port {
            Some(port) if !host.is_empty() => Ok((host.to_owned(), port)),
            _ => Err(expected()),
        };
    }
    let host = lookup(lps_common::config::ENV_MQTT_HOST)
        .or_else(|| lookup(lps_common::config::ENV_MQTT_BROKER))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = match lookup(lps_common::config::ENV_MQTT_PORT) {
        None => 1883,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| anyhow!("MQTT_PORT={text:?}: expected a port number 1-65535"))?,
    };
    Ok((host, port))
}

/// A clean-session client: listing must leave no session behind that would queue letters.
async fn connect(host: &str, port: u16) -> anyhow::Result<MqttClient> {
    let id = format!("lps-dead-letters-{:016x}", rand::random::<u64>());
    let client = MqttClient::with_options(
        ConnectOptions::new(id)
            .with_clean_start(true)
            .with_automatic_reconnect(false),
    );
    client.set_queue_on_disconnect(false).await;
    let address = if host.contains(':') {
        format!("mqtt://[{host}]:{port}")
    } else {
        format!("mqtt://{host}:{port}")
    };
    let hint = "set --broker HOST:PORT, or MQTT_HOST and MQTT_PORT";
    match tokio::time::timeout(CONNECT_TIMEOUT, client.connect(&address)).await {
        Err(_) => bail!(
            "cannot connect to the MQTT broker at {host}:{port}: no answer within {} s ({hint})",
            CONNECT_TIMEOUT.as_secs()
        ),
        Ok(Err(error)) => {
            bail!("cannot connect to the MQTT broker at {host}:{port}: {error} ({hint})")
        }
        Ok(Ok(())) => Ok(client),
    }
}

/// `<key>  <time>  <reason>  <source topic>  <request id>  <size> B  <detail>`.
fn line(letter: &DeadLetter) -> String {
    format!(
        "{}  {:<24}  {:<13}  {:<24}  {:<20}  {:>7} B  {}",
        letter.key,
        letter.dead_lettered_at.as_deref().unwrap_or("-"),
        letter.reason,
        letter.source_topic.as_deref().unwrap_or("-"),
        letter.request_id.as_deref().unwrap_or("-"),
        letter.payload.len(),
        letter.detail
    )
    .trim_end()
    .to_owned()
}

fn json_line(letter: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "key": letter.key,
        "topic": letter.topic,
        "dead_lettered_at": letter.dead_lettered_at,
        "reason": letter.reason,
        "detail": letter.detail,
        "attempt": letter.attempt,
        "source_topic": letter.source_topic,
        "dead_lettered_by": letter.dead_lettered_by,
        "request_id": letter.request_id,
        "size": letter.payload.len(),
        "payload": String::from_utf8_lossy(&letter.payload),
    })
}

fn count_line(count: usize, prefix: &str) -> String {
    match count {
        1 => format!("1 dead letter under {prefix}"),
        n => format!("{n} dead letters under {prefix}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn letter(key: &str, reason: &str, payload: &str) -> DeadLetter {
        let properties = [
            ("dead-letter-reason".to_owned(), reason.to_owned()),
            ("source-topic".to_owned(), "proxy1/message".to_owned()),
            (
                "dead-lettered-at".to_owned(),
                "2025-01-31T12:00:00.123Z".to_owned(),
            ),
        ];
        DeadLetter::parse(
            "p",
            &format!("p/{key}"),
            payload.as_bytes().to_vec(),
            &properties,
        )
        .unwrap()
    }

    #[test]
    fn broker_address_from_the_option_the_environment_or_the_default() {
        let none = |_: &str| None;
        assert_eq!(
            broker_address(None, none).unwrap(),
            ("127.0.0.1".to_owned(), 1883)
        );
        let env: HashMap<&str, &str> = [("MQTT_BROKER", "mosquitto"), ("MQTT_PORT", "1884")].into();
        let lookup = |k: &str| env.get(k).map(|v| (*v).to_owned());
        assert_eq!(
            broker_address(None, lookup).unwrap(),
            ("mosquitto".to_owned(), 1884)
        );
        assert_eq!(
            broker_address(Some("broker:1885"), lookup).unwrap(),
            ("broker".to_owned(), 1885)
        );
        assert_eq!(
            broker_address(Some("mqtt://[::1]:1886"), none).unwrap(),
            ("::1".to_owned(), 1886)
        );
        for bad in ["broker", "broker:x", ":1883", "broker:0"] {
            let error = broker_address(Some(bad), none).unwrap_err().to_string();
            assert!(error.contains("expected HOST:PORT"), "{bad}: {error}");
        }
        let env: HashMap<&str, &str> = [("MQTT_PORT", "nope")].into();
        let error = broker_address(None, |k| env.get(k).map(|v| (*v).to_owned())).unwrap_err();
        assert!(error.to_string().contains("MQTT_PORT"), "{error}");
    }

    #[test]
    fn selection_by_key_and_reason() {
        let letters = [
            letter("a", "rejected: 400", "{}"),
            letter("b", "not_json: expected a JSON object", "x"),
            letter("c", "rejected: 404", "{}"),
        ];
        let keys = |selected: Vec<DeadLetter>| -> Vec<String> {
            selected.into_iter().map(|l| l.key).collect()
        };
        assert_eq!(
            keys(select(&letters, &[], None, "p").unwrap()),
            ["a", "b", "c"]
        );
        assert_eq!(
            keys(select(&letters, &[], Some("rejected"), "p").unwrap()),
            ["a", "c"]
        );
        assert_eq!(
            keys(select(&letters, &[], Some("rejected: 404"), "p").unwrap()),
            ["c"]
        );
        let ab = ["a".to_owned(), "b".to_owned()];
        assert_eq!(keys(select(&letters, &ab, None, "p").unwrap()), ["a", "b"]);
        assert_eq!(
            keys(select(&letters, &ab, Some("rejected"), "p").unwrap()),
            ["a"]
        );
        let error = select(&letters, &["z".to_owned()], None, "p").unwrap_err();
        assert!(
            error.to_string().contains("no dead letter with key z"),
            "{error}"
        );
    }

    #[test]
    fn lines_show_key_time_reason_source_request_id_and_size() {
        let l = letter(
            "k1",
            "rejected: the target rejected it with 400",
            r#"{"request_id":"77"}"#,
        );
        assert_eq!(
            line(&l),
            "k1  2025-01-31T12:00:00.123Z  rejected       proxy1/message            77                         19 B  the target rejected it with 400"
        );
        let json = json_line(&l);
        assert_eq!(json["key"], "k1");
        assert_eq!(json["request_id"], "77");
        assert_eq!(json["size"], 19);
        assert_eq!(json["payload"], r#"{"request_id":"77"}"#);
        assert_eq!(count_line(1, "p"), "1 dead letter under p");
        assert_eq!(count_line(0, "p"), "0 dead letters under p");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_named() {
        let closed = lps_testkit::ClosedPort::new();
        let Err(error) = connect("127.0.0.1", closed.port).await else {
            panic!("connected to a closed port");
        };
        let error = error.to_string();
        assert!(
            error.contains(&format!(
                "cannot connect to the MQTT broker at 127.0.0.1:{}",
                closed.port
            )) && error.contains("--broker"),
            "{error}"
        );
    }
}
