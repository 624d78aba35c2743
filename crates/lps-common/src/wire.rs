//! Wire types that several services must agree on: payloads, paths and bodies.

use serde::{Deserialize, Serialize};

/// The legacy command the alarm chain uses.
pub const STORE_COMMAND: &str = "ID_REQ_KC_STORE7D3BPACKET";

/// The path every relay and bridge serves and forwards to.
pub const STORE_PATH: &str = "/ID_REQ_KC_STORE7D3BPACKET";

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
