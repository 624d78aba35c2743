//! (e) Profiles parse from strings, and bad ones say what is wrong.

use std::time::Duration;

use lps_netem::{Profile, ProfileError};

#[test]
fn the_documented_forms_parse() {
    let p: Profile = "delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25%"
        .parse()
        .unwrap();
    assert_eq!(p, Profile::upstream());
    assert_eq!(p.name, "upstream");
    let lan: Profile = "lan".parse().unwrap();
    assert_eq!(lan.delay, Duration::from_millis(1));
    assert_eq!(lan.jitter, Duration::from_micros(100));
    assert_eq!(lan.rate_bps, None);
    assert!("none".parse::<Profile>().unwrap().is_passthrough());
}

fn error(spec: &str) -> String {
    spec.parse::<Profile>().unwrap_err().to_string()
}

#[test]
fn bad_profiles_say_what_is_wrong() {
    assert_eq!(" ".parse::<Profile>().unwrap_err(), ProfileError::Empty);
    assert!(error("").starts_with("empty network profile: expected upstream, lan, none"));
    assert!(error("wan").starts_with("unknown network profile \"wan\": expected upstream"));
    assert_eq!(
        error("delay=30ms,speed=5mbit"),
        "unknown key \"speed\" in network profile: expected delay, jitter, rate, burst, loss, correlation or rto"
    );
    assert_eq!(
        error("delay=1ms,delay=2ms"),
        "delay given twice in network profile"
    );
    assert_eq!(
        error("delay=30"),
        "delay=\"30\" in network profile: expected a duration from 0 to 60s such as 30ms, 1.5ms, 100us or 1s"
    );
    assert!(error("jitter=-3ms").starts_with("jitter=\"-3ms\""));
    assert!(error("delay=61s").starts_with("delay=\"61s\""));
    assert_eq!(
        error("rate=5mb"),
        "rate=\"5mb\" in network profile: expected a rate such as 5mbit, 100kbit, 1gbit or 625kbps (bytes), or none"
    );
    assert!(error("rate=0mbit").starts_with("rate=\"0mbit\""));
    assert!(error("burst=1kb").contains("from 1514b to 1gb"));
    assert_eq!(
        error("loss=0.01"),
        "loss=\"0.01\" in network profile: expected a percentage from 0% to 100% such as 0.01%"
    );
    assert!(error("correlation=101%").starts_with("correlation=\"101%\""));
    assert!(error("rto=0ms").starts_with("rto=\"0ms\""));
    // A name only comes first.
    assert!(error("delay=1ms,lan").starts_with("unknown network profile \"lan\""));
}
