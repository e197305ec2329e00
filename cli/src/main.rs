//! `muster`: the one binary users run. It serves the control plane
//! (`serve`, `dev`) and operates it (`task …`, `agent …`).

mod bench;
mod output;
mod serve;
mod store;
mod telemetry;
mod token;
mod workflow;

/// mimalloc instead of the system allocator: the store copies its tree
/// nodes on write, and with glibc's malloc a quarter of the server's CPU
/// went to allocating and freeing them (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use muster_sdk::proto;
use muster_sdk::{Client, Credentials, NewTask, TaskState};

use crate::output::Output;
use crate::serve::ServeArgs;

/// Muster: a control plane for fleets of agents.
#[derive(Debug, Parser)]
#[command(name = "muster", version, about)]
struct Cli {
    /// The server's gRPC endpoint; several, comma-separated, for the
    /// replicas of a highly available deployment (the leader is found).
    #[arg(long, global = true, env = "MUSTER_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// The bearer token to call the server with.
    #[arg(long, global = true, env = "MUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA bundle that signs the server's certificate (implies https).
    #[arg(long, global = true, env = "MUSTER_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// This process's PEM certificate: the server's for serve, the client's
    /// (mutual TLS) for every other command.
    #[arg(long, global = true, env = "MUSTER_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, global = true, env = "MUSTER_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// How results are printed.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Export trace spans over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317); off when unset.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Run the control plane with a local data directory and a shell agent.
    ///
    /// Always plaintext and without authentication, so only on loopback
    /// addresses: a config file's [tls], [auth] and `insecure` do not
    /// apply, and --auth, --insecure, --tls-client-ca or a non-loopback
    /// --listen / --http-listen are refused. Use `muster serve` with TLS
    /// and tokens for anything reachable from another machine.
    Dev {
        #[command(flatten)]
        serve: ServeArgs,
        /// Slots of the built-in shell agent.
        #[arg(long, default_value_t = 4)]
        agent_slots: u32,
    },
    /// The server: its version, its store and which replica leads.
    Status,
    /// Submit, inspect, watch, cancel and retry tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Inspect and steer agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Submit and follow graphs of tasks.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// Inspect, pause, resume and weight queues.
    #[command(subcommand)]
    Queue(workflow::QueueCommand),
    /// Create, list and revoke access tokens (admin).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Back up, restore and verify the store.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Measure throughput, latency, idle agents and recovery (Muster's
    /// performance targets) and print a JSON report.
    Bench(bench::BenchArgs),
    /// Run the shell agent (capability `shell`) against --server.
    ShellAgent {
        /// The agent's name [default: shell].
        #[arg(long, env = "MUSTER_AGENT_NAME")]
        name: Option<String>,
        /// Tasks it runs at once [default: 4].
        #[arg(long, env = "MUSTER_SLOTS")]
        slots: Option<u32>,
        /// Execution settings: TOML file, grace, limits, environment.
        #[command(flatten)]
        shell: muster_shell_agent::ShellArgs,
        /// Serve Prometheus metrics at this address's /metrics (port 0 picks
        /// a free port); announced to the server for discovery.
        #[arg(long, env = "MUSTER_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Submit a task.
    Submit(SubmitArgs),
    /// Show one task.
    Get { id: String },
    /// List tasks, oldest first.
    List {
        /// Only tasks in this state (repeatable).
        #[arg(long)]
        state: Vec<String>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        capability: Option<String>,
        /// Most tasks to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Follow task events (all tasks, or one).
    Watch {
        id: Option<String>,
        /// Replay events after this sequence number first.
        #[arg(long)]
        after: Option<u64>,
        /// Replay every retained event first.
        #[arg(long)]
        from_start: bool,
    },
    /// Cancel a task.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Run a FAILED or CANCELLED task again.
    Retry { id: String },
    /// Say why a task is not running.
    Explain { id: String },
    /// Print a task's log lines, attempt by attempt.
    Logs {
        id: String,
        /// Keep printing new lines until the task is finished.
        #[arg(long, short)]
        follow: bool,
        /// Only this attempt (default: every attempt).
        #[arg(long)]
        attempt: Option<u32>,
        /// Start each line with the time the agent produced it.
        #[arg(long)]
        timestamps: bool,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// The capability an agent must have, e.g. shell.
    capability: String,
    /// The payload: literal text, @FILE, or @- for standard input.
    #[arg(long, default_value = "")]
    payload: String,
    /// The payload's media type (default: application/json when it parses
    /// as JSON, else text/plain).
    #[arg(long)]
    content_type: Option<String>,
    /// low, normal, high or critical.
    #[arg(long, default_value = "normal")]
    priority: String,
    /// Agent label that must match, as key=value (repeatable).
    #[arg(long)]
    selector: Vec<String>,
    /// Metadata as key=value (repeatable).
    #[arg(long)]
    metadata: Vec<String>,
    #[arg(long)]
    queue: Option<String>,
    /// Execution timeout, e.g. 30s or 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Attempts in total, including the first.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Resubmitting with the same key returns the existing task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Start no earlier than this long from now, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Wait for the task to finish; exit 0 only if it succeeded.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// List agents.
    List {
        #[arg(long)]
        capability: Option<String>,
    },
    /// Show one agent.
    Get { id: String },
    /// Stop new assignments to an agent; its running work finishes.
    Drain { id: String },
    /// Undo drain.
    Resume { id: String },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let service = match cli.command {
        Command::Serve(_) | Command::Dev { .. } => "muster-server",
        Command::ShellAgent { .. } => "muster-agent",
        Command::Status
        | Command::Task(_)
        | Command::Agent(_)
        | Command::Workflow(_)
        | Command::Queue(_)
        | Command::Token(_) => "muster-cli",
        Command::Bench(_) => "muster-bench",
        Command::Store(_) => "muster-store",
    };
    // The bench runs thousands of agents in this process: only problems.
    let level = if matches!(cli.command, Command::Bench(_)) { "warn" } else { "info" };
    let telemetry = {
        let _runtime = runtime.enter();
        telemetry::Telemetry::init(service, level, cli.otlp_endpoint.as_deref())
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::describe(&e));
            std::process::ExitCode::FAILURE
        }
    };
    // The exporter sends through the runtime, so flush before dropping it.
    telemetry.shutdown();
    code
}

/// Where a command connects and with which credentials.
#[derive(Debug)]
struct Target {
    server: String,
    credentials: Credentials,
}

impl Target {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let credentials = Credentials::from_parts(
            cli.token.as_deref(),
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        )?;
        Ok(Self { server: cli.server.clone(), credentials })
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let out = Output::new(cli.output == Format::Json);
    let tls_files = (cli.tls_cert.clone(), cli.tls_key.clone());
    let target = match &cli.command {
        // For the server, --tls-cert and --tls-key are its own certificate.
        Command::Serve(_) | Command::Dev { .. } | Command::Bench(_) => None,
        _ => Some(Target::new(&cli)?),
    };
    let target = || target.as_ref().context("this command does not connect to a server");
    match cli.command {
        Command::Serve(args) => serve::serve(&args, tls_files).await?,
        Command::Dev { serve, agent_slots } => serve::dev(&serve, agent_slots).await?,
        Command::Task(command) => return task(target()?, command, &out).await,
        Command::Agent(command) => agent(target()?, command, &out).await?,
        Command::Status => out.server(&connect(target()?).await?.server().await?),
        Command::Workflow(command) => {
            let client = connect(target()?).await?;
            if !workflow::workflow(&client, command, &out).await? {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Command::Queue(command) => workflow::queue(&connect(target()?).await?, command, &out).await?,
        Command::Token(command) => token::token(&connect(target()?).await?, command, &out).await?,
        Command::Bench(args) => bench::run(args, cli.output == Format::Json).await?,
        Command::Store(command) => {
            return store::store(command, &cli.server, async || connect(target()?).await, &out).await;
        }
        Command::ShellAgent { name, slots, shell, metrics_listen } => {
            muster_shell_agent::protect_process().context("cannot protect the agent process")?;
            let target = target()?;
            let base = muster_shell_agent::ShellAgentConfig {
                server: target.server.clone(),
                ..muster_shell_agent::ShellAgentConfig::default()
            };
            let mut config = shell.apply(base)?;
            config.name = name.unwrap_or(config.name);
            config.slots = slots.unwrap_or(config.slots);
            config.metrics_listen = metrics_listen.or(config.metrics_listen);
            muster_shell_agent::build_agent_with(&config, target.credentials.clone())?.run().await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Connects to the server, or to the leader among the comma-separated
/// servers of a highly available deployment.
async fn connect(target: &Target) -> anyhow::Result<Client> {
    let endpoints: Vec<String> =
        target.server.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    Client::connect_leader_with(&endpoints, &target.credentials)
        .await
        .with_context(|| format!("cannot reach a muster server that leads at {}", target.server))
}

pub(crate) fn key_value(field: &str, text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => bail!("--{field} takes key=value, got '{text}'"),
    }
}

fn read_payload(text: &str) -> anyhow::Result<Vec<u8>> {
    match text.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading the payload from stdin")?;
            Ok(buf)
        }
        Some(path) => std::fs::read(path).with_context(|| format!("reading the payload from {path}")),
        None => Ok(text.as_bytes().to_vec()),
    }
}

async fn task(target: &Target, command: TaskCommand, out: &Output) -> anyhow::Result<std::process::ExitCode> {
    let client = connect(target).await?;
    match command {
        TaskCommand::Submit(args) => {
            let payload = read_payload(&args.payload)?;
            let content_type = args.content_type.clone().unwrap_or_else(|| {
                if serde_json::from_slice::<serde_json::Value>(&payload).is_ok() {
                    "application/json".into()
                } else {
                    "text/plain".into()
                }
            });
            let priority = proto::Priority::parse(&args.priority).with_context(|| {
                format!("--priority must be low, normal, high or critical, not '{}'", args.priority)
            })?;
            let mut spec =
                NewTask::new(args.capability.clone()).payload(payload).content_type(content_type).priority(priority);
            for s in &args.selector {
                let (k, v) = key_value("selector", s)?;
                spec = spec.selector(k, v);
            }
            for m in &args.metadata {
                let (k, v) = key_value("metadata", m)?;
                spec = spec.metadata(k, v);
            }
            if let Some(q) = &args.queue {
                spec = spec.queue(q.clone());
            }
            if let Some(t) = args.timeout {
                spec = spec.timeout(t);
            }
            if let Some(n) = args.max_attempts {
                spec = spec.max_attempts(n);
            }
            if let Some(k) = &args.idempotency_key {
                spec = spec.idempotency_key(k.clone());
            }
            if let Some(d) = args.delay {
                let at = SystemTime::now()
                    .checked_add(d)
                    .with_context(|| format!("--delay: {} is too far ahead", humantime::format_duration(d)))?;
                spec = spec.not_before(at);
            }
            let task = client.submit(spec.build()).await?;
            if !args.wait {
                out.task(&task);
                return Ok(std::process::ExitCode::SUCCESS);
            }
            let task = client.wait(&task.id).await?;
            out.task(&task);
            if task.state == TaskState::Succeeded {
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                Ok(std::process::ExitCode::FAILURE)
            }
        }
        TaskCommand::Get { id } => {
            out.task(&client.get(&id).await?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::List { state, queue, capability, limit } => {
            let states = state
                .iter()
                .map(|s| TaskState::parse(s).map(i32::from).with_context(|| format!("'{s}' is not a task state")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut tasks = Vec::new();
            let mut page_token = String::new();
            while tasks.len() < limit {
                let page = client
                    .list(proto::ListTasksRequest {
                        states: states.clone(),
                        queue: queue.clone().unwrap_or_default(),
                        capability: capability.clone().unwrap_or_default(),
                        metadata: Default::default(),
                        page_size: (limit - tasks.len()).min(1000) as u32,
                        page_token: page_token.clone(),
                    })
                    .await?;
                tasks.extend(page.tasks);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.tasks(&tasks);
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::Watch { id, after, from_start } => {
            // Follows through reconnects; a resume before what retention
            // kept re-lists and goes on after the listing.
            let mut changes = client.follow(proto::WatchTasksRequest {
                task_id: id.unwrap_or_default(),
                after_sequence: after.unwrap_or(0),
                from_start,
                ..Default::default()
            });
            out.event_header();
            while let Some(change) = changes.next().await {
                match change? {
                    muster_sdk::Change::Event(event) => out.event(&event),
                    muster_sdk::Change::Resync { sequence } => out.resync(sequence),
                    muster_sdk::Change::Current(task) => out.current(&task),
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, reason } => {
            out.task(&client.cancel(&id, &reason).await?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::Retry { id } => {
            out.task(&client.retry(&id).await?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::Explain { id } => {
            workflow::explain(&client, &id, out).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        TaskCommand::Logs { id, follow, attempt, timestamps } => {
            let mut logs = client.logs(&id, attempt.unwrap_or(0), follow).await?;
            let mut printer = output::LogPrinter::new(out, timestamps);
            while let Some(chunk) = logs.next().await {
                printer.chunk(&chunk?);
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

async fn agent(target: &Target, command: AgentCommand, out: &Output) -> anyhow::Result<()> {
    let client = connect(target).await?;
    match command {
        AgentCommand::List { capability } => {
            out.agents(&client.list_agents(capability.as_deref().unwrap_or("")).await?)
        }
        AgentCommand::Get { id } => out.agent(&client.get_agent(&id).await?),
        AgentCommand::Drain { id } => out.agent(&client.drain_agent(&id).await?),
        AgentCommand::Resume { id } => out.agent(&client.resume_agent(&id).await?),
    }
    Ok(())
}
