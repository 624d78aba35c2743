//! Dead letters: messages legacy-proxy-2 can never deliver (not JSON, no request id, too
//! large, refused by the target with a non-retryable 4xx, a handler panic, too many
//! attempts), kept by the broker until an operator replays or clears them.
//!
//! Each dead letter is its own *retained* QoS 2 message on `<prefix>/<key>`
//! ([`crate::wire::dead_letter_topic`]; prefix `DEAD_LETTER_TOPIC`, default
//! `legacy_proxy/dead_letter`; key a UUID v7 in simple form, unique and time-ordered). The
//! broker keeps a retained message with no subscriber present and persists it (Mosquitto
//! in its snapshot, the embedded broker in its file storage), so nothing has to listen.
//! The payload is the original message; MQTT v5 user properties say why and where from
//! (`dead-letter-reason` = `<reason>: <detail>`, `attempt`, `source-topic`,
//! `dead-lettered-by`, `dead-lettered-at`).
//!
//! - [`letter`] builds the topic and publish options legacy-proxy-2 publishes one with.
//! - [`list`] subscribes to `<prefix>/+` and collects the retained set: it reads, never
//!   consumes.
//! - [`replay`] republishes each payload to its source topic (QoS 2, PUBCOMP awaited) and
//!   only then clears the letter (an empty retained publish), after a subscriber [`probe`]
//!   proved a legacy-proxy-2 is listening: Mosquitto drops a QoS 2 message for a `$share`
//!   group with no member while answering a *successful* PUBREC. A crash between the two
//!   steps leaves the letter in place: a later replay duplicates, nothing is lost. (A
//!   Mosquitto snapshot holds either both the republished message and the clear, or
//!   neither the clear, because the clear comes second.)

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use mqtt5::types::Message;
use mqtt5::{
    Delivery, MqttClient, PublishOptions, PublishOutcome, PublishResult, QoS, SubscribeOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::wire::{
    ATTEMPT_PROPERTY, DEAD_LETTER_REASON_PROPERTY, DEAD_LETTERED_AT_PROPERTY,
    DEAD_LETTERED_BY_PROPERTY, PROBE_PROPERTY, PROBE_TOPIC, SOURCE_TOPIC_PROPERTY,
    dead_letter_topic, probe_reply_topic,
};

/// How long [`replay`] waits for a legacy-proxy-2 to answer its probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`replay`] waits for one QoS 2 handshake that did not finish on the connection
/// it started on (the client resends it after a reconnect).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// One dead letter as the broker retains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The unique key: the last topic level (a UUID v7, simple form, for letters
    /// legacy-proxy-2 wrote).
    pub key: String,
    /// Its topic, `<prefix>/<key>`.
    pub topic: String,
    /// The original message, byte for byte.
    pub payload: Vec<u8>,
    /// Why it was dead-lettered: `not_json`, `no_request_id`, `too_large`, `rejected`,
    /// `panic`, `max_attempts` (`unknown` when the property is missing).
    pub reason: String,
    /// The details of the reason (may be empty).
    pub detail: String,
    /// The delivery attempt that dead-lettered it (1 when the property is missing).
    pub attempt: u32,
    /// The topic it came from, e.g. `proxy1/message`; a replay publishes it there.
    pub source_topic: Option<String>,
    /// The legacy-proxy-2 instance that dead-lettered it.
    pub dead_lettered_by: Option<String>,
    /// When (RFC 3339, UTC), as the property says.
    pub dead_lettered_at: Option<String>,
    /// The payload's JSON `request_id`, if it has one.
    pub request_id: Option<String>,
}

impl DeadLetter {
    /// Reads a retained message on `topic` as a dead letter under `prefix`; `None` for an
    /// empty payload (a cleared letter) or a topic that is not `<prefix>/<one level>`.
    pub fn parse(
        prefix: &str,
        topic: &str,
        payload: Vec<u8>,
        user_properties: &[(String, String)],
    ) -> Option<Self> {
        let key = topic.strip_prefix(prefix)?.strip_prefix('/')?;
        if key.is_empty() || key.contains('/') || payload.is_empty() {
            return None;
        }
        let property = |name: &str| {
            user_properties
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let (reason, detail) = match property(DEAD_LETTER_REASON_PROPERTY) {
            Some(value) => match value.split_once(':') {
                Some((reason, detail)) => (reason.trim().to_owned(), detail.trim().to_owned()),
                None => (value.trim().to_owned(), String::new()),
            },
            None => ("unknown".to_owned(), String::new()),
        };
        Some(Self {
            key: key.to_owned(),
            topic: topic.to_owned(),
            request_id: request_id(&payload),
            payload,
            reason,
            detail,
            attempt: property(ATTEMPT_PROPERTY)
                .and_then(|a| a.trim().parse().ok())
                .unwrap_or(1),
            source_topic: property(SOURCE_TOPIC_PROPERTY),
            dead_lettered_by: property(DEAD_LETTERED_BY_PROPERTY),
            dead_lettered_at: property(DEAD_LETTERED_AT_PROPERTY),
        })
    }

    /// `<reason>: <detail>` (or the reason alone), as in the `dead-letter-reason` property.
    pub fn reason_text(&self) -> String {
        if self.detail.is_empty() {
            self.reason.clone()
        } else {
            format!("{}: {}", self.reason, self.detail)
        }
    }
}

/// The payload's JSON `request_id` (a string, or a number written as one).
fn request_id(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match value.get("request_id")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The topic and publish options of a new dead letter under `prefix`: retained, QoS 2,
/// with the user properties `dead-letter-reason` (`<reason>: <detail>`), `attempt`,
/// `source-topic`, `dead-lettered-by` (`by`) and `dead-lettered-at` (now, RFC 3339 UTC,
/// the instant in the key). The caller publishes the original payload with them and waits
/// for PUBCOMP before acknowledging the message it dead-letters.
pub fn letter(
    prefix: &str,
    reason: &str,
    detail: &str,
    attempt: u32,
    source_topic: &str,
    by: &str,
) -> (String, PublishOptions) {
    let key = Uuid::now_v7();
    let (secs, nanos) = key
        .get_timestamp()
        .map_or((0, 0), |timestamp| timestamp.to_unix());
    let at = i64::try_from(secs)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, nanos))
        .unwrap_or_else(chrono::Utc::now);
    letter_with(
        prefix,
        &key.simple().to_string(),
        at,
        reason,
        detail,
        attempt,
        source_topic,
        by,
    )
}

#[allow(clippy::too_many_arguments)]
fn letter_with(
    prefix: &str,
    key: &str,
    at: chrono::DateTime<chrono::Utc>,
    reason: &str,
    detail: &str,
    attempt: u32,
    source_topic: &str,
    by: &str,
) -> (String, PublishOptions) {
    let mut options = PublishOptions {
        qos: QoS::ExactlyOnce,
        retain: true,
        ..PublishOptions::default()
    };
    let reason = if detail.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason}: {detail}")
    };
    options.properties.user_properties = vec![
        (DEAD_LETTER_REASON_PROPERTY.to_owned(), reason),
        (ATTEMPT_PROPERTY.to_owned(), attempt.to_string()),
        (SOURCE_TOPIC_PROPERTY.to_owned(), source_topic.to_owned()),
        (DEAD_LETTERED_BY_PROPERTY.to_owned(), by.to_owned()),
        (
            DEAD_LETTERED_AT_PROPERTY.to_owned(),
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ];
    (dead_letter_topic(prefix, key), options)
}

/// Lists the dead letters under `prefix`, sorted by key (oldest first for UUID v7 keys).
///
/// Subscribes to `<prefix>/+` (QoS 2) and collects the retained messages the broker sends
/// for that subscription until none came for `quiet`, then unsubscribes. It changes
/// nothing on the broker; use a clean session (a persistent one would queue later letters
/// for this client id if the unsubscribe never happened). Messages published live during
/// the listing (not retained-on-subscribe) are ignored, so the result is the retained set
/// as of the subscription.
pub async fn list(
    client: &MqttClient,
    prefix: &str,
    quiet: Duration,
) -> anyhow::Result<Vec<DeadLetter>> {
    let filter = format!("{prefix}/+");
    // Unbounded: what arrives is bounded by the retained set the broker holds.
    let mut rx = subscribe_to_channel(client, &filter, QoS::ExactlyOnce, |message| message).await?;
    let mut letters = BTreeMap::new();
    while let Ok(Some(message)) = tokio::time::timeout(quiet, rx.recv()).await {
        if !message.retain {
            continue;
        }
        if let Some(letter) = DeadLetter::parse(
            prefix,
            &message.topic,
            message.payload,
            &message.properties.user_properties,
        ) {
            letters.insert(letter.key.clone(), letter);
        }
    }
    client
        .unsubscribe(filter.clone())
        .await
        .with_context(|| format!("unsubscribing from {filter}"))?;
    Ok(letters.into_values().collect())
}

/// Subscribes to `filter` at `qos` and returns a channel of `pick(message)` for each message
/// that arrives. Unbounded: the client's callback cannot wait.
async fn subscribe_to_channel<T: Send + 'static>(
    client: &MqttClient,
    filter: &str,
    qos: QoS,
    pick: fn(Message) -> T,
) -> anyhow::Result<mpsc::UnboundedReceiver<T>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = SubscribeOptions {
        qos,
        ..SubscribeOptions::default()
    };
    client
        .subscribe_with_options(filter.to_owned(), options, move |message| {
            let _ = tx.send(pick(message));
        })
        .await
        .with_context(|| format!("subscribing to {filter}"))?;
    Ok(rx)
}

/// Whether a legacy-proxy-2 answers a subscriber probe within `timeout`: subscribes to
/// `reply_topic` (QoS 1), publishes a random token to [`PROBE_TOPIC`] (QoS 1, user property
/// `lps-probe` = `reply_topic`) and waits for the same token on `reply_topic`. Any error
/// (not connected, refused) counts as no answer.
pub async fn probe(client: &MqttClient, reply_topic: &str, timeout: Duration) -> bool {
    match try_probe(client, reply_topic, timeout).await {
        Ok(answered) => answered,
        Err(error) => {
            warn!(%error, "subscriber probe failed");
            false
        }
    }
}

async fn try_probe(
    client: &MqttClient,
    reply_topic: &str,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let token = Uuid::new_v4().simple().to_string();
    let mut rx = subscribe_to_channel(client, reply_topic, QoS::AtLeastOnce, |message| {
        message.payload
    })
    .await?;
    let mut publish = PublishOptions {
        qos: QoS::AtLeastOnce,
        ..PublishOptions::default()
    };
    publish.properties.user_properties = vec![(PROBE_PROPERTY.to_owned(), reply_topic.to_owned())];
    let answered = match client
        .publish_with_options(PROBE_TOPIC, token.clone().into_bytes(), publish)
        .await
    {
        Ok(_) => {
            let wait = async {
                while let Some(payload) = rx.recv().await {
                    if payload == token.as_bytes() {
                        return true;
                    }
                }
                false
            };
            tokio::time::timeout(timeout, wait).await.unwrap_or(false)
        }
        Err(error) => {
            warn!(%error, "subscriber probe not published");
            false
        }
    };
    if let Err(error) = client.unsubscribe(reply_topic.to_owned()).await {
        debug!(%error, reply_topic, "unsubscribing from the probe reply topic failed");
    }
    Ok(answered)
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Keys whose payload the broker completed (PUBCOMP) on the source topic and whose
    /// letter was then cleared, in order.
    pub replayed: Vec<String>,
    /// Letters left alone because they cannot be replayed: (key, why).
    pub skipped: Vec<(String, String)>,
    /// The letter the replay stopped at, if it did.
    pub failed: Option<ReplayFailure>,
    /// Keys not attempted because of the failure; their letters are unchanged.
    pub not_attempted: Vec<String>,
}

/// The letter a replay stopped at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayFailure {
    /// Its key.
    pub key: String,
    /// Whether its payload was delivered (then only the clear failed and the letter is
    /// still there: replaying it again duplicates the message).
    pub delivered: bool,
    /// What went wrong.
    pub error: String,
}

/// Replays `letters` (listed under `prefix`): refuses unless a legacy-proxy-2 answers a
/// [`probe`] (reply topic from the client id, [`PROBE_TIMEOUT`]); then for each letter
/// publishes its payload with QoS 2 and no `attempt` property (a fresh start) to its
/// source topic, waits for PUBCOMP, and only then clears the letter. Stops at the first
/// failure and says so in the report; letters without a usable source topic are skipped.
pub async fn replay(
    client: &MqttClient,
    letters: &[DeadLetter],
    prefix: &str,
) -> anyhow::Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let mut ready = Vec::new();
    for letter in letters {
        match replay_target(letter, prefix) {
            Ok(source) => ready.push((letter, source)),
            Err(why) => report.skipped.push((letter.key.clone(), why)),
        }
    }
    if ready.is_empty() {
        return Ok(report);
    }
    let reply_topic = probe_reply_topic(&client.client_id().await);
    if !probe(client, &reply_topic, PROBE_TIMEOUT).await {
        bail!(
            "no legacy-proxy-2 answered the subscriber probe on {PROBE_TOPIC} within {} s: \
             nothing was replayed (a message published while no legacy-proxy-2 is \
             subscribed can be dropped by the broker); start legacy-proxy-2 and try again",
            PROBE_TIMEOUT.as_secs()
        );
    }
    let mut rest = ready.into_iter();
    for (letter, source) in rest.by_ref() {
        if let Err(error) = publish_fresh(client, source, &letter.payload).await {
            report.failed = Some(ReplayFailure {
                key: letter.key.clone(),
                delivered: false,
                error: format!("publishing to {source}: {error}"),
            });
            break;
        }
        let clear = PublishOptions {
            qos: QoS::ExactlyOnce,
            retain: true,
            ..PublishOptions::default()
        };
        if let Err(error) = complete(client, &letter.topic, Vec::new(), clear).await {
            report.failed = Some(ReplayFailure {
                key: letter.key.clone(),
                delivered: true,
                error: format!(
                    "delivered to {source}, but clearing {} failed: {error}",
                    letter.topic
                ),
            });
            break;
        }
        info!(key = %letter.key, %source, "dead letter replayed");
        report.replayed.push(letter.key.clone());
    }
    report.not_attempted = rest.map(|(letter, _)| letter.key.clone()).collect();
    Ok(report)
}

/// The source topic of `letter`, or why it cannot be replayed.
fn replay_target<'a>(letter: &'a DeadLetter, prefix: &str) -> Result<&'a str, String> {
    if letter.topic != dead_letter_topic(prefix, &letter.key) {
        return Err(format!("its topic {} is not under {prefix}", letter.topic));
    }
    match letter.source_topic.as_deref() {
        None => Err(format!("no {SOURCE_TOPIC_PROPERTY} property")),
        Some(source) if !mqtt5::is_valid_topic_name(source) || source.starts_with('$') => Err(
            format!("{SOURCE_TOPIC_PROPERTY} {source:?} is not a topic one can publish to"),
        ),
        Some(source) => Ok(source),
    }
}

/// Publishes `payload` to `topic` with QoS 2 until a handshake completes on the connection
/// it started on. A completion only after a reconnect proves less (a broker restarted from
/// an older snapshot answers a resent PUBREL with PUBCOMP for a message it lost), so that
/// publish is repeated: a duplicate, never a loss.
async fn publish_fresh(client: &MqttClient, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
    const TRIES: u32 = 3;
    for _ in 0..TRIES {
        let options = PublishOptions {
            qos: QoS::ExactlyOnce,
            ..PublishOptions::default()
        };
        if complete(client, topic, payload.to_vec(), options).await? {
            return Ok(());
        }
        warn!(
            topic,
            "the handshake completed only after a reconnect; publishing again"
        );
    }
    bail!("the QoS 2 handshake completed only after a reconnect {TRIES} times")
}

/// Publishes and waits for the end of the QoS 2 handshake; `Ok(true)` when it completed on
/// the connection it started on, `Ok(false)` when only after a reconnect.
async fn complete(
    client: &MqttClient,
    topic: &str,
    payload: Vec<u8>,
    options: PublishOptions,
) -> anyhow::Result<bool> {
    let result = client
        .publish_with_options(topic, payload, options)
        .await
        .context("the broker did not take the message")?;
    let (delivery, direct) = match result {
        PublishResult::Sent(delivery) => (delivery, true),
        PublishResult::Queued(handle) => {
            match tokio::time::timeout(PUBLISH_TIMEOUT, handle.outcome()).await {
                Err(_) => bail!(
                    "no PUBCOMP within {} s: the outcome is unknown",
                    PUBLISH_TIMEOUT.as_secs()
                ),
                Ok(PublishOutcome::Delivered(delivery)) => (delivery, false),
                Ok(PublishOutcome::Rejected(rejection)) => {
                    bail!("the broker refused it: {rejection:?}")
                }
                Ok(PublishOutcome::Indeterminate(reason)) => {
                    bail!("the outcome is unknown: {reason:?}")
                }
            }
        }
    };
    if !matches!(delivery, Delivery::ExactlyOnce { .. }) {
        bail!(
            "sent with {:?} instead of QoS 2 (the broker's maximum QoS is lower): no PUBCOMP",
            delivery.qos_used()
        );
    }
    Ok(direct)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(options: &PublishOptions) -> &[(String, String)] {
        &options.properties.user_properties
    }

    #[test]
    fn a_letter_is_retained_qos_2_with_its_properties() {
        let at = chrono::DateTime::from_timestamp(1_738_324_800, 123_000_000).unwrap();
        let (topic, options) = letter_with(
            "legacy_proxy/dead_letter",
            "k1",
            at,
            "rejected",
            "the target rejected it with 400 Bad Request",
            3,
            "proxy2-1/retry/message",
            "proxy2-1",
        );
        assert_eq!(topic, "legacy_proxy/dead_letter/k1");
        assert!(options.retain);
        assert_eq!(options.qos, QoS::ExactlyOnce);
        let expected = [
            (
                DEAD_LETTER_REASON_PROPERTY,
                "rejected: the target rejected it with 400 Bad Request",
            ),
            (ATTEMPT_PROPERTY, "3"),
            (SOURCE_TOPIC_PROPERTY, "proxy2-1/retry/message"),
            (DEAD_LETTERED_BY_PROPERTY, "proxy2-1"),
            (DEAD_LETTERED_AT_PROPERTY, "2025-01-31T12:00:00.123Z"),
        ];
        let got: Vec<(&str, &str)> = properties(&options)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn keys_are_unique_time_ordered_uuid_v7_and_match_the_time() {
        let (a, first) = letter("p", "not_json", "x", 1, "proxy1/message", "i");
        let (b, _) = letter("p", "not_json", "x", 1, "proxy1/message", "i");
        let key_a = a.strip_prefix("p/").unwrap();
        let key_b = b.strip_prefix("p/").unwrap();
        assert!(key_a < key_b, "{key_a} !< {key_b}");
        let uuid = Uuid::parse_str(key_a).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(key_a.len(), 32, "simple form");
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        let at = chrono::DateTime::from_timestamp(secs as i64, nanos).unwrap();
        let property = properties(&first)
            .iter()
            .find(|(k, _)| k == DEAD_LETTERED_AT_PROPERTY)
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(
            property,
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        assert!(property.ends_with('Z'));
    }

    #[test]
    fn a_letter_parses_back() {
        let (topic, options) = letter(
            "lp/dl",
            "max_attempts",
            "5 attempts failed: 503",
            5,
            "proxy1/message",
            "proxy2-3",
        );
        let payload = br#"{"id":"1","body":"b","request_id":"1234567890"}"#.to_vec();
        let letter = DeadLetter::parse("lp/dl", &topic, payload.clone(), properties(&options))
            .expect("a letter");
        assert_eq!(letter.topic, topic);
        assert_eq!(letter.key, topic.strip_prefix("lp/dl/").unwrap());
        assert_eq!(letter.payload, payload);
        assert_eq!(letter.reason, "max_attempts");
        assert_eq!(letter.detail, "5 attempts failed: 503");
        assert_eq!(letter.reason_text(), "max_attempts: 5 attempts failed: 503");
        assert_eq!(letter.attempt, 5);
        assert_eq!(letter.source_topic.as_deref(), Some("proxy1/message"));
        assert_eq!(letter.dead_lettered_by.as_deref(), Some("proxy2-3"));
        assert!(letter.dead_lettered_at.is_some());
        assert_eq!(letter.request_id.as_deref(), Some("1234567890"));
    }

    #[test]
    fn parsing_is_lenient_about_properties_and_strict_about_topics() {
        let bare = DeadLetter::parse("p", "p/k", b"not json".to_vec(), &[]).unwrap();
        assert_eq!(
            (bare.reason.as_str(), bare.attempt, bare.request_id),
            ("unknown", 1, None)
        );
        assert_eq!(bare.source_topic, None);
        let props = [(DEAD_LETTER_REASON_PROPERTY.to_owned(), "panic".to_owned())];
        let reason_only = DeadLetter::parse("p", "p/k", b"{}".to_vec(), &props).unwrap();
        assert_eq!(
            (reason_only.reason_text(), reason_only.detail),
            ("panic".to_owned(), String::new())
        );
        let numeric = DeadLetter::parse("p", "p/k", br#"{"request_id":42}"#.to_vec(), &[]);
        assert_eq!(numeric.unwrap().request_id.as_deref(), Some("42"));
        // Cleared (empty), another prefix, nested or empty keys: not letters.
        assert!(DeadLetter::parse("p", "p/k", Vec::new(), &[]).is_none());
        assert!(DeadLetter::parse("p", "q/k", b"x".to_vec(), &[]).is_none());
        assert!(DeadLetter::parse("p", "pp/k", b"x".to_vec(), &[]).is_none());
        assert!(DeadLetter::parse("p", "p/k/x", b"x".to_vec(), &[]).is_none());
        assert!(DeadLetter::parse("p", "p/", b"x".to_vec(), &[]).is_none());
        assert!(DeadLetter::parse("p", "p", b"x".to_vec(), &[]).is_none());
    }

    #[test]
    fn only_letters_with_a_plain_source_topic_under_the_prefix_are_replayable() {
        let good = DeadLetter::parse(
            "p",
            "p/k",
            b"x".to_vec(),
            &[(
                SOURCE_TOPIC_PROPERTY.to_owned(),
                "proxy1/message".to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(replay_target(&good, "p"), Ok("proxy1/message"));
        assert!(replay_target(&good, "other").is_err());
        let mut bad = good.clone();
        bad.source_topic = None;
        assert!(
            replay_target(&bad, "p")
                .unwrap_err()
                .contains(SOURCE_TOPIC_PROPERTY)
        );
        for topic in ["a/+/message", "#", "$share/g/a/message", ""] {
            bad.source_topic = Some(topic.to_owned());
            assert!(replay_target(&bad, "p").is_err(), "{topic}");
        }
    }
}
