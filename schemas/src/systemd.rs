//! systemd readiness (`Type=notify`): both binaries send `READY=1` once they serve
//! (the listener after binding its port, hq-puller after its scheduler started) and
//! `STOPPING=1` when a shutdown begins. Under `WatchdogSec=` (systemd sets
//! `WATCHDOG_USEC`) a task sends `WATCHDOG=1` every half period while the runtime is
//! alive, so a wedged process is restarted. Without `NOTIFY_SOCKET` (not under systemd)
//! nothing is sent; a failure to notify is logged, never fatal.

use sd_notify::NotifyState;

fn send(state: NotifyState<'_>, what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(false, &[state]) {
        Ok(()) => tracing::debug!(state = what, "notified systemd"),
        Err(e) => tracing::warn!(state = what, error = %e, "notifying systemd failed"),
    }
}

/// `READY=1`: the service is up.
pub fn notify_ready() {
    send(NotifyState::Ready, "READY=1");
}

/// `STOPPING=1`: a graceful shutdown has begun.
pub fn notify_stopping() {
    send(NotifyState::Stopping, "STOPPING=1");
}

/// The watchdog period asked for by systemd: `WATCHDOG_USEC`, when `WATCHDOG_PID` is
/// unset or names this process.
pub fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Starts the `WATCHDOG=1` task when systemd asked for one (call inside the runtime).
pub fn spawn_watchdog() {
    let Some(period) = watchdog_period() else {
        return;
    };
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period / 2);
        loop {
            every.tick().await;
            send(NotifyState::Watchdog, "WATCHDOG=1");
        }
    });
}
