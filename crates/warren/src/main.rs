//! The `warren` binary: command line, configuration, logging, signals, and
//! the wiring of the broker's servers.

mod config;
mod ctl;
mod models;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::info;
use warren_amqp::AmqpServer;
use warren_http::{HttpContext, HttpServer};

use warren_infer::deploy::{ModelConfig, expand_repositories, prepare, run_models};

use crate::config::FileConfig;
use crate::models::{DeployedModels, Directory};

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

    /// Run the broker with one model served from a queue: a quick start
    /// for what `[[model]]` in the configuration file declares.
    ///
    /// Requests published to the queue get replies (to their `reply_to`)
    /// with the model's output.
    Deploy(DeployArgs),

    /// Run the model workers of a configuration file against any AMQP
    /// 0-9-1 broker (Warren or RabbitMQ), without a broker of their own.
    Worker(WorkerArgs),

    /// Manage a running broker's users, vhosts and permissions through its
    /// management API (an administrator's credentials; guest by default).
    Ctl(ctl::CtlArgs),
}

#[derive(Debug, clap::Args)]
struct DeployArgs {
    /// The ONNX model file.
    #[arg(value_name = "MODEL.onnx")]
    model: PathBuf,

    /// The queue requests arrive on (declared if missing).
    #[arg(long)]
    queue: String,

    /// What the model does with a request.
    #[arg(long, value_enum, default_value = "embedding")]
    task: DeployTask,

    /// The HuggingFace tokenizer.json (embedding); default: tokenizer.json
    /// beside the model.
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,

    /// The model's name in reply headers; default: the file's stem.
    #[arg(long)]
    name: Option<String>,

    #[arg(long, default_value_t = 32)]
    batch_size_max: usize,

    #[arg(long, default_value_t = 5)]
    batch_delay_max_ms: u64,

    /// Tokens a text is cut to (embedding).
    #[arg(long)]
    max_tokens: Option<usize>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DeployTask {
    Embedding,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// The broker to serve, e.g. amqp://user:password@host:5672/%2f
    #[arg(long, value_name = "URL", env = "WARREN_BROKER_URL")]
    broker: String,

    /// TOML file whose `[[model]]` entries to serve.
    #[arg(long, value_name = "FILE", env = "WARREN_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port for AMQP 0-9-1 clients. `[::]` (the default)
    /// accepts IPv4 and IPv6 clients on one dual-stack socket.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "[::]:5672",
        env = "WARREN_AMQP_LISTEN"
    )]
    amqp_listen: SocketAddr,

    /// Address and port for AMQP over TLS (AMQPS), used when the
    /// configuration file has a `[tls]` section.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "[::]:5671",
        env = "WARREN_AMQPS_LISTEN"
    )]
    amqps_listen: SocketAddr,

    /// Address and port for the HTTP side: the management API, the
    /// dashboard at /, messaging over HTTP and WebSocket, KServe v2
    /// inference and Prometheus metrics (see docs/http-api.md).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "[::]:15672",
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

/// Allocations at least this large get pages of their own from the
/// operating system, which go back to it when they are freed.
///
/// glibc raises this threshold on its own, up to 32 MiB, whenever such a
/// block is freed: one login's Argon2 check (19 MiB, freed at once) was
/// enough to make every later block under 19 MiB come from the heap
/// instead, where a freed one stays resident. A queue's index growing by
/// doubling then left its outgrown arrays behind, about 20 MiB that a
/// million-message backlog kept for good. Fixed at 4 MiB: message bodies up
/// to 4 MiB still reuse the heap, and what larger blocks leave behind is
/// returned.
const MMAP_THRESHOLD_BYTES: i32 = 4 * 1024 * 1024;
/// Free memory at the top of a heap beyond this goes back to the operating
/// system. Fixing the mmap threshold also fixes this one, at 128 KiB unless
/// set; twice the mmap threshold is what glibc itself would pair with it,
/// and spares a busy broker giving back and faulting in the same pages.
const TRIM_THRESHOLD_BYTES: i32 = 2 * MMAP_THRESHOLD_BYTES;

fn main() -> anyhow::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's own settings, and runs
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Command::Ctl(args) = cli.command {
        return ctl::run(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warren")
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args, Vec::new())),
        Command::Deploy(args) => {
            let model = deployed_model(&args)?;
            runtime.block_on(serve(args.serve, vec![model]))
        }
        Command::Worker(args) => runtime.block_on(worker(args)),
        Command::Ctl(_) => unreachable!("ctl runs without the async runtime"),
    }
}

/// The `[[model]]` entry `warren deploy` stands for.
fn deployed_model(args: &DeployArgs) -> anyhow::Result<ModelConfig> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .model
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or("model")
            .to_owned(),
    };
    let tokenizer = args.tokenizer.clone().or_else(|| {
        args.model
            .parent()
            .map(|directory| directory.join("tokenizer.json"))
    });
    let entry = format!(
        "name = {name:?}\npath = {path:?}\ntask = {task:?}\nqueue = {queue:?}\n\
         batch_size_max = {batch}\nbatch_delay_max_ms = {delay}\n",
        path = args.model.display().to_string(),
        task = match args.task {
            DeployTask::Embedding => "embedding",
        },
        queue = args.queue,
        batch = args.batch_size_max,
        delay = args.batch_delay_max_ms,
    );
    let mut model: ModelConfig = toml::from_str(&entry).context("building the model entry")?;
    model.tokenizer = tokenizer;
    model.max_tokens = args.max_tokens;
    Ok(model)
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let file_config = FileConfig::load(&args.config)?;
    anyhow::ensure!(
        !file_config.models.is_empty(),
        "{} declares no [[model]] to serve",
        args.config.display()
    );
    let signal = shutdown_signal()?;
    let (shutdown_sender, shutdown) = watch::channel(false);
    let models = expand_repositories(file_config.models)?;
    let metrics = prepare(&models)?;
    let deployment = run_models(models, metrics, args.broker.clone(), shutdown).await?;
    info!(broker = %redact(&args.broker), "model workers running");
    signal.await;
    info!("shutting down");
    let _ = shutdown_sender.send(true);
    deployment.finish().await;
    Ok(())
}

/// A broker URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn serve(args: ServeArgs, extra_models: Vec<ModelConfig>) -> anyhow::Result<()> {
    let file_config = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let mut models = file_config.models.clone();
    models.extend(extra_models);
    let mut amqp_config = file_config.amqp_config()?;
    amqp_config.storage.data_dir = Some(args.data_dir.clone());
    let disk_free_limit_bytes = amqp_config.storage.disk_free_limit_bytes;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let access = Arc::new(file_config.access_control(Some(args.data_dir.clone()))?);
    amqp_config.access = Arc::clone(&access);
    if let Some(tls) = &file_config.tls {
        amqp_config.amqps = Some(warren_amqp::Amqps {
            address: args.amqps_listen,
            tls: warren_amqp::tls::server_config(&tls.files(), &[]).context("[tls] for AMQPS")?,
        });
    }

    let server = AmqpServer::bind(args.amqp_listen, amqp_config)
        .await
        .with_context(|| format!("binding the AMQP listener to {}", args.amqp_listen))?;
    let address = server.local_addr()?;
    let tls_address = server.tls_local_addr().transpose()?;
    let hub = server.hub();
    let events = Arc::new(warren_http::model_events::ModelEvents::start(
        server.direct(),
        address,
    ));
    let deployed_models = Arc::new(DeployedModels::new(events));
    let http = HttpServer::bind(
        args.http_listen,
        file_config.http_config()?,
        HttpContext {
            hub: hub.clone(),
            admin: server.admin(),
            direct: server.direct(),
            amqp_address: address,
            amqps_address: tls_address,
            models: Arc::new(Directory(Arc::clone(&deployed_models)))
                as Arc<dyn warren_http::models::ModelDirectory>,
            node_name: node_name(),
            data_dir: Some(args.data_dir.clone()),
            disk_free_limit_bytes,
            tls_files: file_config.tls.as_ref().map(|tls| tls.files()),
        },
    )
    .await
    .with_context(|| format!("binding the HTTP listener to {}", args.http_listen))?;
    let http_address = http.local_addr()?;
    if let Some(path) = &file_config.load_definitions {
        let definitions = std::fs::read(path)
            .with_context(|| format!("reading load_definitions {}", path.display()))?;
        http.load_definitions(&definitions)
            .await
            .map_err(|error| anyhow::anyhow!("load_definitions {}: {error}", path.display()))?;
        info!(file = %path.display(), "definitions loaded");
    }
    let signal = shutdown_signal()?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %args.data_dir.display(),
        "Warren starting"
    );
    // The HTTP line comes first: tools wait for the AMQP line and then
    // find both addresses logged.
    info!(addr = %http_address, https = file_config.tls.as_ref().is_some_and(|tls| tls.https),
        "HTTP listener ready");
    if let Some(tls_address) = tls_address {
        info!(addr = %tls_address, "AMQPS listener ready");
    }
    info!(addr = %address, "AMQP listener ready");

    let (shutdown_sender, shutdown) = watch::channel(false);
    let server_task = tokio::spawn(server.run(shutdown.clone()));
    let http_task = tokio::spawn(http.run(shutdown.clone()));
    let models = expand_repositories(models)?;
    let metrics = prepare(&models)?;
    deployed_models.set(&models, &metrics);
    // In-process model workers reach the broker over loopback AMQP, like
    // any other client, as the broker's own identity: they keep working
    // whatever operators do to guest or to any other user. Versions loaded
    // later through the management API run the same way.
    let host = if address.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        address.ip().to_string()
    };
    let url = format!(
        "amqp://{}:{}@{host}:{}/%2f",
        warren_access::INTERNAL_USER,
        access.internal_secret(),
        address.port()
    );
    deployed_models.start(url, shutdown, hub).await?;
    signal.await;
    info!("shutting down");
    let _ = shutdown_sender.send(true);
    deployed_models.finish().await;
    // Requests in flight get a few seconds to finish (an inference is
    // bounded by its own timeout, which may be longer).
    match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "the HTTP server failed"),
        Ok(Err(error)) => tracing::error!(%error, "the HTTP server task panicked"),
        Err(_) => tracing::warn!("HTTP requests still running at shutdown were dropped"),
    }
    server_task.await.context("AMQP server task")?;
    info!("stopped");
    Ok(())
}

/// How long shutdown waits for HTTP requests in flight.
const HTTP_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The node's name in the management API: `warren@HOST`, as RabbitMQ
/// names its nodes `rabbit@HOST`.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("warren@{host}")
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
