//! `branch-listener` binary: parses the command line and runs one command.

use branch_listener::{config, install, serve, Config, Error};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Branch side of branch-to-HQ replication: captures changes and serves them to HQ"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "BRANCH_LISTENER_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the pull protocol (the default).
    Serve,
    /// Install (or update) the pull area and capture triggers in the branch database.
    Install {
        /// Also create the built-in product-management tables (and the SQLite file).
        #[arg(long)]
        with_demo_schema: bool,
    },
    /// Remove the triggers and the pull area (the application's tables stay).
    Uninstall,
    /// Validate the configuration, print a summary.
    CheckConfig {
        /// Exit 1 when the branch database is not reachable (otherwise it is only reported).
        #[arg(long)]
        require_database: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("branch-listener: {e}");
            return ExitCode::from(2);
        }
    };
    schemas::telemetry::init(cfg.log_format == "json");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("branch-listener: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(cli.command.unwrap_or(Command::Serve), cfg));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("branch-listener: {e}");
            tracing::error!(error = %e, "exiting");
            ExitCode::from(if matches!(e, Error::Config { .. }) {
                2
            } else {
                1
            })
        }
    }
}

async fn run(command: Command, cfg: Config) -> Result<(), Error> {
    match command {
        Command::CheckConfig { require_database } => {
            println!("config ok: {}", cfg.summary());
            let db = branch_listener::preflight::database(&cfg).await?;
            println!("{}", db.line());
            if require_database && !db.reachable() {
                return Err(Error::Io("the branch database is not reachable".into()));
            }
            Ok(())
        }
        Command::Install { with_demo_schema } => {
            let db = branch_listener::db::Db::connect_lazy(&cfg, with_demo_schema)?;
            let outcome = install::install(&db, &cfg.catalogue()?, with_demo_schema).await;
            db.close().await;
            println!("{}", outcome?);
            Ok(())
        }
        Command::Uninstall => {
            let db = branch_listener::db::Db::connect_lazy(&cfg, false)?;
            let found = install::uninstall(&db).await;
            db.close().await;
            if found? {
                println!("uninstalled the pull area and capture triggers");
            } else {
                println!("nothing was installed: nothing to do");
            }
            Ok(())
        }
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(cfg.listen_addr()?)
                .await
                .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", cfg.listen)))?;
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutdown signal received");
                token.cancel();
            });
            serve::run(cfg, listener, shutdown).await
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
