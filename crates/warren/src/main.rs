//! The `warren` binary: command line, configuration, logging, signals, and
//! the wiring of the broker's servers.

mod config;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::info;
use warren_amqp::AmqpServer;

use crate::config::FileConfig;

/// Warren: a message broker for AI/ML workloads that speaks AMQP 0-9-1 with
/// RabbitMQ's semantics, so RabbitMQ clients (pika, Celery/kombu, amqplib,
/// lapin) work against it by changing only the URL.
#[derive(Debug, Parser)]
#[command(name = "warren", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    ///
    /// Clients connect to amqp://guest:guest@localhost:5672/ by default (the
    /// guest user may connect only from the local machine). Stop it with
    /// Ctrl-C or SIGTERM: connections are closed cleanly.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port for AMQP 0-9-1 clients.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:5672",
        env = "WARREN_AMQP_LISTEN"
    )]
    amqp_listen: SocketAddr,

    /// Address and port for the HTTP management API and dashboard (reserved;
    /// the HTTP server is not part of this release yet).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:15672",
        env = "WARREN_HTTP_LISTEN"
    )]
    http_listen: SocketAddr,

    /// Directory for the broker's data.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "./warren-data",
        env = "WARREN_DATA_DIR"
    )]
    data_dir: PathBuf,

    /// TOML configuration file: limits, users and vhosts (see docs/configuration.md).
    #[arg(long, value_name = "FILE", env = "WARREN_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("warren")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file_config = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let mut amqp_config = file_config.amqp_config()?;
    amqp_config.storage.data_dir = Some(args.data_dir.clone());
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;

    let server = AmqpServer::bind(args.amqp_listen, amqp_config)
        .await
        .with_context(|| format!("binding the AMQP listener to {}", args.amqp_listen))?;
    let address = server.local_addr()?;
    let signal = shutdown_signal()?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %args.data_dir.display(),
        "Warren starting"
    );
    info!(addr = %address, "AMQP listener ready");

    let (shutdown_sender, shutdown) = watch::channel(false);
    let server_task = tokio::spawn(server.run(shutdown));
    signal.await;
    info!("shutting down");
    let _ = shutdown_sender.send(true);
    server_task.await.context("AMQP server task")?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, so call it before announcing readiness: a signal that arrives
/// before then would otherwise kill the process uncleanly.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
