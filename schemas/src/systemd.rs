//! systemd readiness (`Type=notify`): both binaries send `READY=1` once they serve
//! (the listener after binding its port, hq-puller after its scheduler started) and
//! `STOPPING=1` when a shutdown begins. Without `NOTIFY_SOCKET` (not under systemd)
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
