//! Wire types that several services must agree on: payloads, paths and bodies.

use serde::{Deserialize, Serialize};

/// The legacy command the alarm chain uses.
pub const STORE_COMMAND: &str = "ID_REQ_KC_STORE7D3BPACKET";

/// The path every relay and bridge serves and forwards to.
pub const STORE_PATH: &str = "/ID_REQ_KC_STORE7D3BPACKET";

/// Liveness: 200 while the process serves (every service).
pub const HEALTHZ_PATH: &str = "/healthz";

/// Readiness: 200 once a bridge can do its work, 503 before (the bridges).
pub const READYZ_PATH: &str = "/readyz";

/// The Prometheus text exposition (every service).
pub const METRICS_PATH: &str = "/metrics";

/// The body of a successful relay answer, as upstream.
pub const SUCCESS_BODY: &str =
    r#"{"status":"success","message":"Data published to Legacy System"}"#;

/// A legacy message `{"id","body"}` as ars-comp-2 and legacy-proxy-1 accept it (extra fields
/// are ignored), and `{"id","body","request_id"}` as they send it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyMessage {
    /// The device id (ars-comp-1 puts the phone number here).
    pub id: String,
    /// The message text.
    pub body: String,
    /// The request id; set on the way out, ignored on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// MQTT v5 user property carrying the delivery attempt of a message (1 when absent).
pub const ATTEMPT_PROPERTY: &str = "attempt";

/// MQTT v5 user property that marks a subscriber probe; its value is the reply topic.
pub const PROBE_PROPERTY: &str = "lps-probe";

/// The topic subscriber probes travel on. It matches none of the traffic filters
/// ([`bridge_filters`]), so a subscriber that does not speak the probe (upstream's
/// legacy_proxy_2) never receives one, and legacy-proxy-2 hears it on a control connection
/// of its own whose session holds no backlog: an answer never waits behind traffic.
///
/// A probe is a QoS 1 message whose payload is an opaque token and whose
/// [`PROBE_PROPERTY`] names the reply topic; a legacy-proxy-2 whose traffic subscriptions
/// are live on its current connection publishes the same token to the reply topic (QoS 1).
pub const PROBE_TOPIC: &str = "lps/probe/request";

/// MQTT v5 user property carrying the earliest time (Unix milliseconds) a retried message
/// may be attempted again.
pub const NOT_BEFORE_PROPERTY: &str = "not-before";

/// MQTT v5 user property on a retried message: why its last attempt failed.
pub const LAST_ERROR_PROPERTY: &str = "last-error";

/// MQTT v5 user property naming the topic a dead letter (or a retry) came from.
pub const SOURCE_TOPIC_PROPERTY: &str = "source-topic";

/// MQTT v5 user property naming the legacy-proxy-2 instance that dead-lettered a message.
pub const DEAD_LETTERED_BY_PROPERTY: &str = "dead-lettered-by";

/// MQTT v5 user property with the time (RFC 3339, UTC) a message was dead-lettered.
pub const DEAD_LETTERED_AT_PROPERTY: &str = "dead-lettered-at";

/// The default dead-letter topic prefix (`DEAD_LETTER_TOPIC`).
pub const DEAD_LETTER_TOPIC: &str = "legacy_proxy/dead_letter";

/// The topic of one dead letter: `<prefix>/<key>`, published *retained* with QoS 2, so the
/// broker keeps it (and persists it) with no subscriber present; `key` is unique
/// (a UUID v7, time-ordered). Clearing it is a retained publish with an empty payload.
pub fn dead_letter_topic(prefix: &str, key: &str) -> String {
    format!("{prefix}/{key}")
}

/// MQTT v5 user property naming why a message was dead-lettered.
pub const DEAD_LETTER_REASON_PROPERTY: &str = "dead-letter-reason";

/// The shared-subscription group of the legacy-proxy-2 instances.
pub const SHARE_GROUP: &str = "legacy_proxy";

/// The topic a legacy-proxy-2 instance republishes a failed message to.
pub fn retry_topic(service_name: &str) -> String {
    format!("{service_name}/retry/message")
}

/// The topic a legacy-proxy-1 instance hears probe answers on.
pub fn probe_reply_topic(client_id: &str) -> String {
    format!("lps/probe/{client_id}")
}

/// The filters legacy-proxy-2 subscribes to in `group`: first deliveries and retries.
pub fn bridge_filters(group: &str) -> [String; 2] {
    [
        format!("$share/{group}/+/message"),
        format!("$share/{group}/+/retry/message"),
    ]
}

/// The largest message payload the bridges carry, by default (`MAX_PAYLOAD_BYTES` in both):
/// legacy-proxy-1 refuses a larger one with 413 before publishing, so whatever it
/// acknowledges, legacy-proxy-2 can forward. 1 MiB is far above an alarm (~150 bytes) and
/// below Mosquitto 2.1's default packet limit (2,000,000 bytes).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Why an MQTT payload cannot be forwarded: a dead-letter reason label and the details.
pub type PayloadRejection = (&'static str, String);

/// Checks a bridged MQTT payload as legacy-proxy-2 must before forwarding it: at most
/// `max_bytes`, a JSON object, with a `request_id` that is a decimal id (a string or a
/// number). The request id on success; otherwise the reason (`too_large`, `not_json`,
/// `no_request_id`) and what is wrong. A rejected payload is a permanent failure (dead
/// letter): retrying cannot mend it.
pub fn validate_payload(
    payload: &[u8],
    max_bytes: usize,
) -> Result<crate::request_id::RequestId, PayloadRejection> {
    if payload.len() > max_bytes {
        return Err((
            "too_large",
            format!(
                "payload of {} bytes exceeds MAX_PAYLOAD_BYTES={max_bytes}",
                payload.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| ("not_json", format!("payload is not JSON: {e}")))?;
    let id = match value.get("request_id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err((
                "no_request_id",
                format!("request_id is not a decimal id: {other}"),
            ));
        }
        None if value.is_object() => {
            return Err(("no_request_id", "payload has no request_id".to_owned()));
        }
        None => return Err(("not_json", "payload is not a JSON object".to_owned())),
    };
    crate::request_id::RequestId::parse(&id).map_err(|e| ("no_request_id", e.message))
}

/// The key and opening quote of the `request_id` a relay adds: `,"request_id":"`.
pub const REQUEST_ID_FIELD: &[u8] = br#","request_id":""#;

/// A legacy message in the compact form `serde_json` writes (see [`compact_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactMessage<'a> {
    /// The length of the prefix that ends with the `body` string: where a relay splices
    /// its `request_id` in.
    pub end: usize,
    /// The `request_id` it carries, as written between its quotes (escapes untouched).
    pub request_id: Option<&'a [u8]>,
}

/// Whether `json` is exactly what `serde_json` writes for a [`LegacyMessage`]:
/// `{"id":S,"body":S}` or `{"id":S,"body":S,"request_id":S}`, no whitespace, every string
/// `S` escaped as `serde_json` escapes it (`\"`, `\\`, `\b \f \n \r \t`, `\u00xx` for the
/// other control characters, everything else raw). `None` for any other form. Checks the
/// form only, without allocating; with `json` valid UTF-8 as well, it is valid JSON.
///
/// Then `json[..end]` + [`REQUEST_ID_FIELD`] + the id + `"}` is, byte for byte, what
/// `serde_json::to_vec` gives for the message with that `request_id` (a request id is
/// digits only and needs no escaping): what [`crate::api::legacy_payload`] sends.
pub fn compact_message(json: &[u8]) -> Option<CompactMessage<'_>> {
    let rest = json.strip_prefix(br#"{"id":"#)?;
    let at = json.len() - rest.len();
    let at = at + canonical_string_len(rest)?;
    let rest = json[at..].strip_prefix(br#","body":"#)?;
    let body_start = json.len() - rest.len();
    let end = body_start + canonical_string_len(rest)?;
    match &json[end..] {
        b"}" => Some(CompactMessage {
            end,
            request_id: None,
        }),
        tail => {
            let rest = tail.strip_prefix(br#","request_id":"#)?;
            let len = canonical_string_len(rest)?;
            (rest.get(len..) == Some(b"}".as_slice())).then(|| CompactMessage {
                end,
                request_id: Some(&rest[1..len - 1]),
            })
        }
    }
}

/// The length of the JSON string at the start of `s` (quotes included) if it is written as
/// `serde_json` writes strings; `None` if it is not, or is not a string.
fn canonical_string_len(s: &[u8]) -> Option<usize> {
    if s.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    loop {
        i += skip_plain(&s[i..]);
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *s.get(i + 1)? {
                b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    // `\u00xx`, lower-case hex, for a control character other than the
                    // five serde_json writes in short form.
                    let value = match s.get(i + 2..i + 6)? {
                        [b'0', b'0', high @ (b'0' | b'1'), low] => {
                            let low = match low {
                                b'0'..=b'9' => low - b'0',
                                b'a'..=b'f' => low - b'a' + 10,
                                _ => return None,
                            };
                            (high - b'0') << 4 | low
                        }
                        _ => return None,
                    };
                    if matches!(value, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            // A raw control character: not valid JSON.
            _ => return None,
        }
    }
}

/// How many bytes at the start of `s` need no look: neither `"`, `\` nor a control
/// character. A block at a time, without an early exit inside it, which the compiler
/// vectorises: bodies can be large.
fn skip_plain(s: &[u8]) -> usize {
    const BLOCK: usize = 32;
    let mut i = 0;
    for block in s.chunks_exact(BLOCK) {
        // Bitwise, not `||`: no branch per byte, so that this compiles to vector compares.
        let mut special = 0u8;
        for &b in block {
            special |= u8::from(b == b'"') | u8::from(b == b'\\') | u8::from(b < 0x20);
        }
        if special != 0 {
            break;
        }
        i += BLOCK;
    }
    i + s[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(s.len() - i)
}
