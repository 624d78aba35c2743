//! Waiting for a condition: the one poll-until-deadline loop of the workspace.

use std::time::Duration;

/// Calls `check` every `every` until it returns `Some`, and returns that; `None` once
/// `within` has passed without one. `check` runs at least once, and once more at the
/// deadline, so a condition met while the last pause ran is not missed.
pub async fn poll_until<T, F, Fut>(within: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(every.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_found() {
        let mut calls = 0;
        let found = poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
            calls += 1;
            std::future::ready((calls == 3).then_some(calls))
        })
        .await;
        assert_eq!(found, Some(3));
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_after_a_last_check() {
        let within = Duration::from_millis(60);
        let started = tokio::time::Instant::now();
        let mut last = None;
        let found: Option<()> = poll_until(within, Duration::from_millis(25), || {
            last = Some(started.elapsed());
            std::future::ready(None)
        })
        .await;
        assert_eq!(found, None);
        assert!(started.elapsed() >= within);
        // The last check ran at the deadline, not one pause before it.
        assert!(last.unwrap() >= within, "{last:?}");
    }
}
