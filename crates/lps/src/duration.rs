//! Durations on the command line, as people write them.

use std::time::Duration;

/// The form, for `--help` and errors.
pub const FORM: &str = "30 (seconds), 30s, 1m, 1m30s or 500ms";

/// Parses `30` (a bare number is seconds, `0.5` too), `30s`, `1m`, `1m30s`, `500ms`, `2h`
/// (humantime's units).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?}: expected a duration such as {FORM}"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e}; expected a duration such as {FORM}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (text, expected) in [
            ("30", Ok(s(30))),
            ("0.5", Ok(ms(500))),
            (" 40 ", Ok(s(40))),
            ("30s", Ok(s(30))),
            ("1m", Ok(s(60))),
            ("1m30s", Ok(s(90))),
            ("1m 30s", Ok(s(90))),
            ("90s", Ok(s(90))),
            ("500ms", Ok(ms(500))),
            ("2h", Ok(s(7200))),
            ("0", Ok(s(0))),
            ("", Err(())),
            ("-1", Err(())),
            ("NaN", Err(())),
            ("inf", Err(())),
            ("30x", Err(())),
            ("1m30", Err(())),
            ("s", Err(())),
        ] {
            let parsed = parse(text);
            match expected {
                Ok(duration) => assert_eq!(parsed, Ok(duration), "{text:?}"),
                Err(()) => {
                    let error = parsed.expect_err(text);
                    assert!(error.contains(FORM), "{text:?}: {error}");
                }
            }
        }
    }
}
