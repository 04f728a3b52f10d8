//! Tracing set-up shared by both binaries: `RUST_LOG`-style filter (default `info`),
//! human-readable lines on a terminal, JSON lines when asked (`log_format = "json"`).

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. Safe to call twice (the second call is ignored).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,hyper=warn,reqwest=warn,tokio_cron_scheduler=warn")
    });
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        // Colours only on a terminal: a log file or the journal gets plain text.
        builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}
