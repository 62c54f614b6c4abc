//! `warren-bench`: a load generator for AMQP 0-9-1 brokers (Warren or
//! RabbitMQ). Parses the command line, runs the benchmark, prints the summary
//! to stdout and optionally writes JSON. The only place that uses `anyhow`.

mod cli;
mod client;
mod consumer;
mod error;
mod idle;
mod producer;
mod progress;
mod rate;
mod report;
mod rss;
mod run;
mod stall;
mod stamp;
mod stats;
mod stop;
mod topology;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser};

use crate::cli::{Args, Config};

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    // lapin reports protocol trouble through tracing; RUST_LOG=lapin=debug
    // shows it on stderr when a broker misbehaves. Silent by default so the
    // progress display stays clean.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(message) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit(),
    };
    // In stall mode the probe's threads start first, and everything started
    // after them runs at a lower priority (see stall/threads.rs).
    let probe_threads = match config.mode {
        cli::Mode::Stall { .. } => {
            Some(stall::ProbeThreads::start().context("starting the probe's tokio runtime")?)
        }
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = runtime
        .block_on(run::run(&config, probe_threads.as_ref()))
        .context("benchmark failed")?;
    print!("{}", report.render());
    if let Some(path) = &config.json {
        report.write_json(path)?;
    }
    // Errors during the run (a connection closed by the broker, confirms
    // that never came) still print the numbers, but the exit status says the
    // run was not clean, so scripts notice.
    Ok(if report.errors.is_empty() && !report.interrupted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
