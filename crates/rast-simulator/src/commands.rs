//! The legacy command names the simulator knows, with their ordinals (`ReqType` in the
//! processing-time model).
//!
//! Only `ID_REQ_KC_STORE7D3BPACKET` and its ordinal 9 come from upstream's model; the other
//! names stand in for the rest of the legacy command set so that the background workload
//! has non-alarm commands to send.

/// Known commands; the index is the ordinal.
pub const COMMANDS: &[&str] = &[
    "ID_REQ_KC_LOGIN",
    "ID_REQ_KC_LOGOUT",
    "ID_REQ_KC_HEARTBEAT",
    "ID_REQ_KC_GETSTATUS",
    "ID_REQ_KC_GETCONFIG",
    "ID_REQ_KC_SETCONFIG",
    "ID_REQ_KC_GETEVENTS",
    "ID_REQ_KC_ACKEVENT",
    "ID_REQ_KC_STOREPACKET",
    "ID_REQ_KC_STORE7D3BPACKET",
    "ID_REQ_KC_GETDEVICE",
    "ID_REQ_KC_SETDEVICE",
    "ID_REQ_KC_GETBRANCH",
    "ID_REQ_KC_GETHISTORY",
    "ID_REQ_KC_CLEARALARM",
    "ID_REQ_KC_TESTALARM",
    "ID_REQ_KC_GETUSERS",
    "ID_REQ_KC_SYNCTIME",
];

/// The ordinal of `name`, if it is a known command.
pub fn ordinal(name: &str) -> Option<u32> {
    COMMANDS
        .iter()
        .position(|c| *c == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// Commands other than the alarm command, for the background workload.
pub fn background_commands() -> impl Iterator<Item = &'static str> {
    COMMANDS
        .iter()
        .copied()
        .filter(|c| *c != lps_common::wire::STORE_COMMAND)
}

#[cfg(test)]
mod tests {
    #[test]
    fn store_command_has_upstream_ordinal() {
        assert_eq!(super::ordinal(lps_common::wire::STORE_COMMAND), Some(9));
        assert_eq!(super::ordinal("NOPE"), None);
        assert_eq!(
            super::background_commands().count(),
            super::COMMANDS.len() - 1
        );
    }
}
