//! Shaping profiles: what one direction of a relay does to the bytes it carries.
//!
//! A profile is written like tc's arguments, as a named profile, a list of `key=value`
//! pairs, or a name followed by overrides:
//!
//! ```text
//! upstream
//! lan
//! none
//! delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25%
//! upstream,loss=0%
//! ```
//!
//! Units as tc writes them: durations `s`, `ms`, `us`; rates `bit`, `kbit`, `mbit`, `gbit`
//! (powers of 1000) or `bps`, `kbps`, `mbps` (bytes per second); sizes `b`, `kb`/`k`,
//! `mb`/`m` (powers of 1024, so upstream's `18kb` is 18 432 bytes); `loss` and
//! `correlation` in percent with a `%`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Payload bytes of one emulated TCP segment: an Ethernet MTU of 1500 less 20 bytes of IP
/// and 32 of TCP header with timestamps. Loss is drawn, and the bucket charged, per
/// segment.
pub const SEGMENT_BYTES: usize = 1448;

/// What a segment costs the token bucket besides its payload: the Ethernet (14), IP (20)
/// and TCP (32) headers, because tbf counts whole frames. A bulk transfer through
/// `rate=5mbit` therefore carries 5 × 1448 / 1514 = 4.78 Mbit/s of payload, as upstream's.
pub const SEGMENT_OVERHEAD_BYTES: usize = 66;

/// Linux's minimum retransmission timeout (`TCP_RTO_MIN`).
pub const RTO_MIN: Duration = Duration::from_millis(200);

/// The longest delay, jitter or RTO a profile accepts; longer values are typing errors.
pub const MAX_DURATION: Duration = Duration::from_secs(60);

/// The smallest burst: one full frame, below which tbf never sends a full segment.
pub const MIN_BURST_BYTES: u64 = (SEGMENT_BYTES + SEGMENT_OVERHEAD_BYTES) as u64;

/// How one direction of a hop is shaped (see the crate documentation for the model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// `upstream`, `lan` or `none` when the profile is exactly that one, else `custom`.
    pub name: String,
    /// Mean one-way delay added to every segment.
    #[serde(rename = "delay_ms", with = "millis")]
    pub delay: Duration,
    /// Standard deviation of the normally distributed delay (truncated at ±4σ and at 0,
    /// as netem's `distribution normal` table).
    #[serde(rename = "jitter_ms", with = "millis")]
    pub jitter: Duration,
    /// Token-bucket rate in bits per second (frames, headers included), shared by all
    /// connections through the relay in this direction; `None` for no limit.
    pub rate_bps: Option<u64>,
    /// Token-bucket depth in bytes: what may leave at once after a pause.
    pub burst_bytes: u64,
    /// Probability in percent that a segment is lost, which costs a retransmission stall.
    pub loss_percent: f64,
    /// netem's loss correlation in percent: each draw is `u·(1−ρ) + last·ρ`.
    pub correlation_percent: f64,
    /// The stall of a lost segment: the retransmission timeout. Default: Linux's minimum
    /// (200 ms) plus the round trip, taken as twice `delay` (RTO = SRTT + max(4·RTTVAR,
    /// 200 ms) with both directions shaped alike).
    #[serde(rename = "rto_ms", with = "millis")]
    pub rto: Duration,
}

impl Default for Profile {
    /// Upstream's profile.
    fn default() -> Self {
        Self::upstream()
    }
}

impl Profile {
    /// The names [`Profile::named`] knows.
    pub const NAMES: [&'static str; 3] = ["upstream", "lan", "none"];

    /// Upstream's `tc` profile (SPEC §5): tbf 5 Mbit/s with an 18 kB burst feeding netem
    /// delay 30 ms ± 3 ms (normal), loss 0.01 % with 25 % correlation.
    pub fn upstream() -> Self {
        Self {
            name: "upstream".into(),
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(3),
            rate_bps: Some(5_000_000),
            burst_bytes: 18 * 1024,
            loss_percent: 0.01,
            correlation_percent: 25.0,
            rto: default_rto(Duration::from_millis(30)),
        }
    }

    /// A local network: 1 ms ± 0.1 ms, no rate limit, no loss.
    pub fn lan() -> Self {
        Self {
            name: "lan".into(),
            delay: Duration::from_millis(1),
            jitter: Duration::from_micros(100),
            rto: default_rto(Duration::from_millis(1)),
            ..Self::none()
        }
    }

    /// No shaping at all: the relay only copies.
    pub fn none() -> Self {
        Self {
            name: "none".into(),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            burst_bytes: 18 * 1024,
            loss_percent: 0.0,
            correlation_percent: 0.0,
            rto: default_rto(Duration::ZERO),
        }
    }

    /// The profile called `name` (`upstream`, `lan`, `none`; case-insensitive).
    pub fn named(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "upstream" => Some(Self::upstream()),
            "lan" => Some(Self::lan()),
            "none" | "off" => Some(Self::none()),
            _ => None,
        }
    }

    /// True when the profile changes nothing, so the relay can skip all scheduling.
    pub fn is_passthrough(&self) -> bool {
        self.delay.is_zero()
            && self.jitter.is_zero()
            && self.rate_bps.is_none()
            && self.loss_percent <= 0.0
    }

    /// The full form, every key given, which parses back to an equal profile (less the
    /// name): `delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25%,rto=260ms`.
    pub fn spec(&self) -> String {
        let rate = self.rate_bps.map_or_else(|| "none".to_owned(), format_rate);
        format!(
            "delay={},jitter={},rate={rate},burst={},loss={}%,correlation={}%,rto={}",
            format_duration(self.delay),
            format_duration(self.jitter),
            format_size(self.burst_bytes),
            self.loss_percent,
            self.correlation_percent,
            format_duration(self.rto),
        )
    }
}

/// The RTO a lost segment costs when the profile names none: [`RTO_MIN`] plus the round
/// trip of a hop shaped alike both ways.
pub fn default_rto(delay: Duration) -> Duration {
    RTO_MIN + delay * 2
}

impl fmt::Display for Profile {
    /// The name when the profile is a named one, else [`Profile::spec`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::named(&self.name) {
            Some(named) if named == *self => f.write_str(&self.name),
            _ => f.write_str(&self.spec()),
        }
    }
}

/// Why a profile string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Nothing was given.
    #[error("empty network profile: expected {FORMS}")]
    Empty,
    /// A bare word that is not a profile name, or a name after the first item.
    #[error("unknown network profile {0:?}: expected {FORMS}")]
    UnknownName(String),
    /// A key the profile does not have.
    #[error(
        "unknown key {0:?} in network profile: expected delay, jitter, rate, burst, loss, correlation or rto"
    )]
    UnknownKey(String),
    /// A key given twice.
    #[error("{0} given twice in network profile")]
    Duplicate(&'static str),
    /// A value that does not parse or is out of range.
    #[error("{key}={value:?} in network profile: expected {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value found.
        value: String,
        /// The accepted form, in words.
        expected: &'static str,
    },
}

const FORMS: &str = "upstream, lan, none, or key=value pairs such as \
    delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25% \
    (optionally after a name: upstream,loss=0%)";

const KEYS: [&str; 7] = [
    "delay",
    "jitter",
    "rate",
    "burst",
    "loss",
    "correlation",
    "rto",
];

impl FromStr for Profile {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = s.split(',').map(str::trim).collect();
        if items.iter().all(|item| item.is_empty()) {
            return Err(ProfileError::Empty);
        }
        let (mut profile, pairs) = match items[0].split_once('=') {
            None => {
                let base = Self::named(items[0])
                    .ok_or_else(|| ProfileError::UnknownName(items[0].to_owned()))?;
                (base, &items[1..])
            }
            Some(_) => (Self::none(), &items[..]),
        };
        let mut seen = [false; KEYS.len()];
        let mut rto_given = false;
        for item in pairs {
            if item.is_empty() {
                continue;
            }
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ProfileError::UnknownName((*item).to_owned()))?;
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            let key = match key.as_str() {
                "corr" => "correlation",
                other => other,
            };
            let index = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| ProfileError::UnknownKey(key.to_owned()))?;
            let key = KEYS[index];
            if std::mem::replace(&mut seen[index], true) {
                return Err(ProfileError::Duplicate(key));
            }
            let bad = |expected: &'static str| ProfileError::BadValue {
                key,
                value: value.to_owned(),
                expected,
            };
            match key {
                "delay" => profile.delay = parse_duration(value).ok_or_else(|| bad(DURATION))?,
                "jitter" => profile.jitter = parse_duration(value).ok_or_else(|| bad(DURATION))?,
                "rto" => {
                    profile.rto = parse_duration(value)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| bad(DURATION))?;
                    rto_given = true;
                }
                "rate" => profile.rate_bps = parse_rate(value).ok_or_else(|| bad(RATE))?,
                "burst" => {
                    profile.burst_bytes = parse_size(value)
                        .filter(|b| (MIN_BURST_BYTES..=1 << 30).contains(b))
                        .ok_or_else(|| bad(SIZE))?;
                }
                "loss" => {
                    profile.loss_percent = parse_percent(value).ok_or_else(|| bad(PERCENT))?
                }
                _ => {
                    profile.correlation_percent =
                        parse_percent(value).ok_or_else(|| bad(PERCENT))?;
                }
            }
        }
        if !rto_given {
            profile.rto = default_rto(profile.delay);
        }
        // The name says which profile this is only when it is exactly a named one.
        profile.name = Self::NAMES
            .into_iter()
            .filter_map(Self::named)
            .find(|named| {
                Profile {
                    name: named.name.clone(),
                    ..profile.clone()
                } == *named
            })
            .map_or_else(|| "custom".to_owned(), |named| named.name);
        Ok(profile)
    }
}

const DURATION: &str = "a duration from 0 to 60s such as 30ms, 1.5ms, 100us or 1s";
const RATE: &str = "a rate such as 5mbit, 100kbit, 1gbit or 625kbps (bytes), or none";
const SIZE: &str = "a size from 1514b to 1gb such as 18kb, 64k, 1mb or 20000 (bytes)";
const PERCENT: &str = "a percentage from 0% to 100% such as 0.01%";

fn split_number(value: &str) -> Option<(f64, String)> {
    let value = value.trim();
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let number: f64 = value[..end].parse().ok()?;
    number
        .is_finite()
        .then(|| (number, value[end..].trim().to_ascii_lowercase()))
}

fn parse_duration(value: &str) -> Option<Duration> {
    let (number, unit) = split_number(value)?;
    let seconds = match unit.as_str() {
        "s" | "sec" | "secs" => number,
        "ms" | "msec" | "msecs" => number / 1e3,
        "us" | "usec" | "usecs" => number / 1e6,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
}

fn parse_rate(value: &str) -> Option<Option<u64>> {
    if value.eq_ignore_ascii_case("none") {
        return Some(None);
    }
    let (number, unit) = split_number(value)?;
    let bits_per_unit = match unit.as_str() {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => return None,
    };
    let bps = number * bits_per_unit;
    // At least 8 kbit/s (a segment per 1.5 s), at most 100 Gbit/s.
    (8e3..=1e11)
        .contains(&bps)
        .then_some(Some(bps.round() as u64))
}

fn parse_size(value: &str) -> Option<u64> {
    let (number, unit) = split_number(value)?;
    let factor = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1024.0,
        "m" | "mb" => 1024.0 * 1024.0,
        "g" | "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes <= 1e12).then_some(bytes.round() as u64)
}

fn parse_percent(value: &str) -> Option<f64> {
    let number: f64 = value.trim().strip_suffix('%')?.trim().parse().ok()?;
    (0.0..=100.0).contains(&number).then_some(number)
}

fn format_duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros % 1000 == 0 {
        format!("{}ms", micros / 1000)
    } else {
        format!("{micros}us")
    }
}

fn format_rate(bps: u64) -> String {
    match bps {
        b if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        b => format!("{b}bit"),
    }
}

fn format_size(bytes: u64) -> String {
    match bytes {
        b if b % (1 << 20) == 0 => format!("{}mb", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}kb", b >> 10),
        b => format!("{b}b"),
    }
}

/// Durations as (fractional) milliseconds in JSON: `"delay_ms": 30.0`.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1e3)
            .ok()
            .filter(|d| *d <= super::MAX_DURATION)
            .ok_or_else(|| serde::de::Error::custom("expected milliseconds from 0 to 60000"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_the_default_and_spells_like_tc() {
        let p = Profile::default();
        assert_eq!(p, Profile::upstream());
        assert_eq!(
            p.spec(),
            "delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25%,rto=260ms"
        );
        assert_eq!(p.to_string(), "upstream");
        let parsed: Profile = p.spec().parse().unwrap();
        assert_eq!(parsed.name, "upstream");
        assert_eq!(parsed, p);
    }

    #[test]
    fn key_value_lists_start_from_none_and_derive_the_rto() {
        let p: Profile = "delay=10ms, jitter=0.5ms".parse().unwrap();
        assert_eq!(p.name, "custom");
        assert_eq!(p.delay, Duration::from_millis(10));
        assert_eq!(p.jitter, Duration::from_micros(500));
        assert_eq!(p.rate_bps, None);
        assert_eq!(p.rto, Duration::from_millis(220));
        assert_eq!(p.to_string(), p.spec());
        assert_eq!(p.spec().parse::<Profile>().unwrap(), p);
    }

    #[test]
    fn names_take_overrides() {
        let p: Profile = "upstream,loss=0%,rate=none".parse().unwrap();
        assert_eq!(p.name, "custom");
        assert_eq!(p.delay, Duration::from_millis(30));
        assert_eq!(p.loss_percent, 0.0);
        assert_eq!(p.rate_bps, None);
        assert!("none".parse::<Profile>().unwrap().is_passthrough());
        assert!(!"lan".parse::<Profile>().unwrap().is_passthrough());
        assert_eq!("LAN".parse::<Profile>().unwrap(), Profile::lan());
    }

    #[test]
    fn units_follow_tc() {
        let p: Profile = "rate=625kbps,burst=20000".parse().unwrap();
        assert_eq!(p.rate_bps, Some(5_000_000));
        assert_eq!(p.burst_bytes, 20_000);
        let p: Profile = "rate=1.5mbit,burst=1mb,rto=1s".parse().unwrap();
        assert_eq!(p.rate_bps, Some(1_500_000));
        assert_eq!(p.burst_bytes, 1 << 20);
        assert_eq!(p.rto, Duration::from_secs(1));
        assert_eq!(
            p.spec(),
            "delay=0ms,jitter=0ms,rate=1500kbit,burst=1mb,loss=0%,correlation=0%,rto=1000ms"
        );
    }

    #[test]
    fn serde_writes_units_into_the_names() {
        let json = serde_json::to_value(Profile::upstream()).unwrap();
        assert_eq!(json["delay_ms"], 30.0);
        assert_eq!(json["rate_bps"], 5_000_000);
        assert_eq!(json["loss_percent"], 0.01);
        let back: Profile = serde_json::from_value(json).unwrap();
        assert_eq!(back, Profile::upstream());
    }
}
