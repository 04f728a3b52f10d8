//! `hq-puller`: parses the command line and calls the library.

use clap::{Parser, Subcommand};
use hq_puller::config::{self, next_fires, Mode};
use hq_puller::{App, Error};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hq-puller",
    version,
    about = "Pulls branch change streams into the HQ PostgreSQL"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "HQ_PULLER_CONFIG",
        default_value = "/etc/hq-puller/config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler (the systemd service; the default).
    Run,
    /// Apply the sync migrations, create/extend the mirror tables, register locations.
    Migrate,
    /// Drain locations once until caught up; exit 1 if any failed.
    Pull {
        /// The location to pull.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        location: Option<String>,
        /// Pull every enabled location.
        #[arg(long)]
        all: bool,
    },
    /// Show each location's state, last success, cursor, backlog, lag and last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Clear a `paused` or `needs_resync` state after the cause was fixed.
    Resume { location: String },
    /// Validate the configuration and print each location's next three run times.
    CheckConfig {
        /// Exit 1 when the HQ database is not reachable (otherwise it is only reported).
        #[arg(long)]
        require_database: bool,
    },
    /// Reload a location from a branch snapshot (after needs_resync): staged, then
    /// switched in one transaction; streaming continues from the snapshot.
    Resync { location: String },
    /// Compare HQ with the branch chunk by chunk; list differing keys. Exit 0 only when
    /// equal.
    Verify {
        /// The location to verify.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        location: Option<String>,
        /// Verify every enabled location.
        #[arg(long)]
        all: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Rows per checksum chunk.
        #[arg(long, default_value_t = schemas::wire::DEFAULT_CHUNK_ROWS)]
        chunk_rows: u32,
        /// How long to wait for HQ to catch up before reporting a difference.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        settle: std::time::Duration,
    },
    /// Sweep the file store now: remove content objects no file refers to and leftovers
    /// of interrupted downloads (the service does it at `files_gc_schedule`).
    GcFiles {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Keep what is younger than this (default: `files_gc_min_age`).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_age: Option<std::time::Duration>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match config::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hq-puller: configuration error:\n{e}");
            return ExitCode::from(2);
        }
    };
    schemas::telemetry::init(settings.log_format == config::LogFormat::Json);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hq-puller: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command.unwrap_or(Command::Run), settings)) {
        Ok(code) => code,
        Err(e) => {
            let code = if matches!(e, Error::Config(_)) { 2 } else { 1 };
            tracing::error!(error = %e, "hq-puller failed");
            eprintln!("hq-puller: {e}");
            ExitCode::from(code)
        }
    }
}

async fn dispatch(cmd: Command, settings: config::Settings) -> Result<ExitCode, Error> {
    match cmd {
        Command::CheckConfig { require_database } => {
            let now = chrono::Utc::now();
            println!(
                "configuration ok: {} locations, catalogue of {} tables",
                settings.locations.len(),
                settings.catalogue.tables.len()
            );
            for l in &settings.locations {
                let when = if !l.enabled {
                    "disabled".to_string()
                } else if l.mode == Mode::Stream {
                    "stream (long-poll)".to_string()
                } else {
                    next_fires(&l.cron, now, 3)
                        .iter()
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!("{:<12} {:<24} {}  next: {}", l.id, l.schedule, l.url, when);
            }
            let db = hq_puller::preflight::database(&settings).await;
            println!("{}", db.line());
            Ok(if require_database && !db.reachable() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::GcFiles { dry_run, min_age } => {
            let Some(root) = &settings.files_dir else {
                return Err(Error::Config(
                    "files_dir is not set: there is no file store to sweep".into(),
                ));
            };
            let min_age = min_age.unwrap_or(settings.files_gc_min_age);
            let store = hq_puller::files::Store::new(root);
            let s = tokio::task::spawn_blocking(move || {
                hq_puller::files::gc::sweep(&store, min_age, dry_run)
            })
            .await
            .map_err(|e| Error::Other(format!("file store sweep: {e}")))??;
            println!(
                "{} {} unreferenced objects ({} bytes) and {} download leftovers ({} bytes); {} objects in use kept",
                if dry_run { "would remove" } else { "removed" },
                s.objects,
                s.object_bytes,
                s.leftovers,
                s.leftover_bytes,
                s.kept
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received");
                s.cancel();
            });
            hq_puller::run(settings, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let app = App::connect(settings, CancellationToken::new()).await?;
            hq_puller::migrate(&app).await?;
            println!(
                "migrated: sync schema, {} mirror tables, {} locations registered",
                app.settings.catalogue.tables.len(),
                app.settings.locations.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull { location, all } => {
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                s.cancel();
            });
            let targets: Vec<String> = if all {
                settings
                    .locations
                    .iter()
                    .filter(|l| l.enabled)
                    .map(|l| l.id.clone())
                    .collect()
            } else {
                let id = location.expect("clap requires a location without --all");
                if settings.location(&id).is_none() {
                    return Err(Error::Config(format!(
                        "unknown location {id:?} (not in the config)"
                    )));
                }
                vec![id]
            };
            hq_puller::transport::warn_plain_http(&settings);
            let app = App::connect(settings, shutdown).await?;
            hq_puller::check_migrated(&app).await?;
            let reports = hq_puller::pull_once(&app, &targets).await?;
            let mut failed = false;
            for r in &reports {
                // A paused location that was not pulled is not caught up either.
                failed |= r.failed() || r.outcome == hq_puller::pull::SKIPPED;
                println!(
                    "{}: {} changes in {} batches, {}{}",
                    r.location,
                    r.totals.changes,
                    r.totals.batches,
                    r.outcome,
                    r.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status { json } => {
            let app = App::connect(settings, CancellationToken::new()).await?;
            let rows = hq_puller::status::build(
                hq_puller::store::status(&app.pool).await?,
                &app.settings,
                chrono::Utc::now(),
            );
            if json {
                println!("{}", hq_puller::status::json(&rows));
            } else {
                print!("{}", hq_puller::status::table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resync { location } => {
            let Some(loc) = settings.location(&location).cloned() else {
                return Err(Error::Config(format!(
                    "unknown location {location:?} (not in the config)"
                )));
            };
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                s.cancel();
            });
            let app = App::connect(settings, shutdown).await?;
            hq_puller::check_migrated(&app).await?;
            match hq_puller::load::resync(&app, &loc).await? {
                hq_puller::load::Loaded::Done { start, rows } => {
                    println!(
                        "{location}: resynced {rows} rows; streaming continues from tick {}",
                        start.tick
                    );
                    Ok(ExitCode::SUCCESS)
                }
                hq_puller::load::Loaded::Interrupted => {
                    println!("{location}: resync interrupted; run it again to resume");
                    Ok(ExitCode::from(1))
                }
                hq_puller::load::Loaded::Unsupported => {
                    println!("{location}: the listener cannot serve a snapshot (upgrade it)");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Verify {
            location,
            all,
            json,
            chunk_rows,
            settle,
        } => {
            let targets: Vec<_> = if all {
                settings
                    .locations
                    .iter()
                    .filter(|l| l.enabled)
                    .cloned()
                    .collect()
            } else {
                let id = location.expect("clap requires a location without --all");
                match settings.location(&id) {
                    Some(l) => vec![l.clone()],
                    None => {
                        return Err(Error::Config(format!(
                            "unknown location {id:?} (not in the config)"
                        )))
                    }
                }
            };
            let app = App::connect(settings, CancellationToken::new()).await?;
            hq_puller::check_migrated(&app).await?;
            let opts = hq_puller::verify::Options {
                chunk_rows: chunk_rows.max(1),
                settle,
                ..Default::default()
            };
            let mut results = Vec::new();
            for l in &targets {
                results.push(hq_puller::verify::verify_location(&app, l, &opts).await);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&results).expect("results serialize")
                );
            } else {
                for r in &results {
                    print!("{r}");
                }
                let bad = results.iter().filter(|r| !r.equal).count();
                println!(
                    "verify: {} of {} locations equal",
                    results.len() - bad,
                    results.len()
                );
            }
            Ok(if results.iter().all(|r| r.equal) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Resume { location } => {
            let app = App::connect(settings, CancellationToken::new()).await?;
            let prev = hq_puller::store::resume(&app.pool, &location).await?;
            println!(
                "{location}: {prev} -> ok (pulled again from its stored cursor at the next fire)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
