//! Test hook for crash tests. When `STVAULT_TEST_PAUSE_AT` names a point,
//! such as `rotate:after_pending`, the operation reaching that point logs
//! "paused at test hook point" and never continues, so a test can `kill -9`
//! the process at exactly that step. The variable is read once at startup;
//! unset or empty, every point does nothing.

use std::sync::OnceLock;

pub const ENV_PAUSE_AT: &str = "STVAULT_TEST_PAUSE_AT";

static PAUSE_AT: OnceLock<Option<String>> = OnceLock::new();

/// Reads `STVAULT_TEST_PAUSE_AT`; later calls keep the first value.
pub fn init_from_env() {
    PAUSE_AT.get_or_init(|| std::env::var(ENV_PAUSE_AT).ok().filter(|v| !v.is_empty()));
    if let Some(Some(point)) = PAUSE_AT.get() {
        tracing::warn!(
            hook.point = %point,
            "test hook armed: the process will stop at this point; never set {ENV_PAUSE_AT} in production"
        );
    }
}

/// Waits forever if the hook names `name`; returns at once otherwise.
pub async fn point(name: &'static str) {
    if PAUSE_AT.get().and_then(Option::as_deref) == Some(name) {
        tracing::warn!(hook.point = name, "paused at test hook point");
        std::future::pending::<()>().await;
    }
}
