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
