//! `meshbus`: run a peer, publish, tail, and look at the mesh.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt as _;
use meshbus::api::PublishRequest;
use meshbus::client::{Client, StreamItem};
use meshbus::config::{self, API_ENV};
use meshbus::{CloudEvent, Config, HandlerSpec, Multiaddr, Node, Pattern};

#[derive(Parser)]
#[command(name = "meshbus", version, about = "A peer-to-peer event mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a peer: discover the LAN, join the mesh, serve the API, run the handler table.
    Up(UpArgs),
    /// Publish an event through the local peer.
    Publish(PublishArgs),
    /// Show events arriving at the local peer as they come.
    Tail(TailArgs),
    /// List the peers the local peer is connected to.
    Peers(ShowArgs),
    /// Show the local peer's status and counters.
    Status(ShowArgs),
    /// List the local peer's handler table and its counters.
    Handlers(ShowArgs),
    /// Re-read the local peer's config file and swap its handler table in (or say why not).
    Reload(ShowArgs),
}

#[derive(Args)]
struct ApiArg {
    /// The peer's HTTP API.
    #[arg(long, env = API_ENV, default_value_t = config::DEFAULT_API)]
    api: SocketAddr,
}

#[derive(Args)]
struct UpArgs {
    /// A name for this peer, shown in `peers`.
    #[arg(long)]
    name: Option<String>,
    /// Address to listen on (repeatable); default all IPv4 interfaces on TCP and QUIC port 7421.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// Peer to dial and keep dialling (repeatable), e.g. /ip4/10.0.0.2/tcp/7421.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<Multiaddr>,
    /// Do not discover peers by mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Where to serve the HTTP API [default: $MESHBUS_API, else 127.0.0.1:7420].
    #[arg(long, env = API_ENV)]
    api: Option<SocketAddr>,
    /// A TOML config file: [node] settings and [[handler]] rows (see the README). SIGHUP or
    /// `meshbus reload` re-reads its handler table.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Add a handler row, PATTERN=ACTION (repeatable). Actions: log, file:PATH, exec:COMMAND,
    /// http://URL.
    #[arg(long = "on", value_name = "PATTERN=ACTION")]
    on: Vec<HandlerSpec>,
    /// Do not print every event received (the default `**=log` handler).
    #[arg(long)]
    quiet: bool,
    /// Largest event accepted, in bytes [default: 262144].
    #[arg(long)]
    max_event_size: Option<usize>,
    /// Time limit of exec handlers, in seconds [default: 30].
    #[arg(long)]
    exec_timeout: Option<u64>,
    /// Where the peer keeps its identity key (default $XDG_DATA_HOME/meshbus or
    /// ~/.local/share/meshbus). The same directory gives the same peer id after a restart.
    #[arg(long, env = "MESHBUS_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct PublishArgs {
    /// Topic, e.g. orders.created.
    topic: String,
    /// Data: JSON if it parses as JSON, else a string; `-` reads standard input.
    data: Option<String>,
    /// Event type (default: the topic).
    #[arg(long = "type")]
    event_type: Option<String>,
    #[command(flatten)]
    api: ApiArg,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TailArgs {
    /// Topic pattern: `*` is one segment, `**` the rest.
    #[arg(default_value = "**")]
    pattern: String,
    #[command(flatten)]
    api: ApiArg,
    /// Print each event as CloudEvents JSON.
    #[arg(long)]
    json: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    api: ApiArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshbus=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshbus: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshbus: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Up(args) => up(args).await,
        Cmd::Publish(args) => publish(args).await,
        Cmd::Tail(args) => tail(args).await,
        Cmd::Peers(args) => peers(args).await,
        Cmd::Status(args) => status(args).await,
        Cmd::Handlers(args) => handlers(args).await,
        Cmd::Reload(args) => {
            let names = Client::new(args.api.api).reload().await?;
            if args.json {
                println!("{}", serde_json::to_string(&names)?);
            } else {
                println!("reloaded: {} handler(s): {}", names.len(), names.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => meshbus::config::file::ConfigFile::load(path)?,
        None => meshbus::config::file::ConfigFile::default(),
    };
    let n = &file.node;
    let data_dir = match args.data_dir.clone().or(n.data_dir.clone()) {
        Some(dir) => dir,
        None => meshbus::identity::default_data_dir()?,
    };
    let identity = meshbus::identity::load_or_create(&data_dir)?;
    let parse = |addrs: &[String], key: &str| -> anyhow::Result<Vec<Multiaddr>> {
        addrs
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("[node] {key}: `{a}` is not a multiaddr"))
            })
            .collect()
    };
    let listen = match (args.listen.is_empty(), &n.listen) {
        (false, _) => args.listen.clone(),
        (true, Some(addrs)) => parse(addrs, "listen")?,
        (true, None) => config::default_listen(),
    };
    let mut peers = parse(&n.peers, "peers")?;
    peers.extend(args.peers.iter().cloned());
    let config = Config {
        name: args.name.clone().or(n.name.clone()),
        keypair: Some(identity.keypair.clone()),
        listen,
        peers,
        mdns: !args.no_mdns && n.mdns.unwrap_or(true),
        api: Some(args.api.or(n.api).unwrap_or(config::DEFAULT_API)),
        max_event_size: args
            .max_event_size
            .or(n.max_event_size)
            .unwrap_or(config::DEFAULT_MAX_EVENT_SIZE),
        exec_timeout: args
            .exec_timeout
            .map(std::time::Duration::from_secs)
            .or(n.exec_timeout)
            .unwrap_or(config::DEFAULT_EXEC_TIMEOUT),
        ..Config::default()
    };
    let quiet = args.quiet || n.quiet.unwrap_or(false);
    // The table: the file's rows, then `--on` rows, then the default log row. A reload
    // rebuilds it the same way from a fresh read of the file.
    let table = {
        let (path, on) = (args.config.clone(), args.on.clone());
        move || -> Result<Vec<HandlerSpec>, String> {
            let mut specs = match &path {
                Some(path) => {
                    meshbus::config::file::ConfigFile::load(path)
                        .map_err(|e| e.to_string())?
                        .handlers
                }
                None => Vec::new(),
            };
            specs.extend(on.iter().cloned());
            if !quiet {
                specs.push(HandlerSpec::new(Pattern::all(), meshbus::Action::Log));
            }
            Ok(specs)
        }
    };
    let mut first = file.handlers.clone();
    first.extend(args.on.iter().cloned());
    if !quiet {
        first.push(HandlerSpec::new(Pattern::all(), meshbus::Action::Log));
    }
    let node = Node::start(config).await.context("cannot start the peer")?;
    if let Err(e) = node.set_handlers(first) {
        node.shutdown().await;
        return Err(e).context("cannot build the handler table");
    }
    node.set_reload_source(table);
    let status = node.status().await?;
    let mut err = std::io::stderr().lock();
    writeln!(err, "meshbus: peer {} is up", status.peer_id)?;
    if let Some(api) = node.api_addr() {
        writeln!(err, "meshbus: api http://{api}")?;
    }
    for addr in &status.listen_addrs {
        writeln!(err, "meshbus: listening on {addr}")?;
    }
    writeln!(err, "meshbus: data dir {}", data_dir.display())?;
    drop(err);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let handle = node.handle();
    let reloads = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            if let Err(e) = handle.reload() {
                tracing::warn!(error = %e, "SIGHUP: reload refused");
            }
        }
    });
    shutdown_signal().await?;
    tracing::info!("stopping");
    reloads.abort();
    node.shutdown().await;
    drop(identity);
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let data = match args.data.as_deref() {
        Some("-") => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("cannot read data from standard input")?;
            if input.ends_with('\n') {
                input.pop();
            }
            Some(input)
        }
        other => other.map(str::to_owned),
    };
    let payload = data.as_deref().map(meshbus::Payload::guess);
    let request = PublishRequest {
        topic: args.topic,
        event_type: args.event_type,
        ..request_for(payload)?
    };
    let published = Client::new(args.api.api).publish(&request).await?;
    if args.json {
        println!("{}", serde_json::to_string(&published)?);
    } else {
        let peers = if published.sent_to == 1 {
            "peer"
        } else {
            "peers"
        };
        println!(
            "{} sent to {} {peers} (seq {})",
            published.id, published.sent_to, published.seq
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The request fields for a payload guessed from the command line.
fn request_for(payload: Option<meshbus::Payload>) -> anyhow::Result<PublishRequest> {
    let Some(payload) = payload else {
        return Ok(PublishRequest::default());
    };
    let text = String::from_utf8(payload.data.to_vec())?;
    let data = if meshbus::event::is_json(&payload.content_type) {
        serde_json::value::RawValue::from_string(text)?
    } else {
        serde_json::value::to_raw_value(&text)?
    };
    Ok(PublishRequest {
        datacontenttype: Some(payload.content_type),
        data: Some(data),
        ..PublishRequest::default()
    })
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    Pattern::new(args.pattern.as_str())?;
    let stream = Client::new(args.api.api).events(&args.pattern).await?;
    futures::pin_mut!(stream);
    let mut seen = 0;
    let mut out = std::io::stdout();
    while args.count.is_none_or(|n| seen < n) {
        let Some(item) = stream.next().await else {
            bail!("the peer closed the event stream");
        };
        match item? {
            StreamItem::Event(json) => {
                if args.json {
                    writeln!(out, "{json}")?;
                } else {
                    let event: CloudEvent = serde_json::from_str(&json).with_context(|| {
                        format!("the peer sent an event that is not CloudEvents JSON: {json}")
                    })?;
                    writeln!(out, "{}", event.summary_line())?;
                }
                out.flush()?;
                seen += 1;
            }
            StreamItem::Missed(n) => eprintln!("meshbus: missed {n} events (reading too slowly)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn peers(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let peers = Client::new(args.api.api).peers().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(ExitCode::SUCCESS);
    }
    if peers.is_empty() {
        println!("no peers connected");
    }
    for p in peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.2} ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<54} {:<12} {:<10} {}",
            p.peer_id,
            p.name.as_deref().unwrap_or("-"),
            rtt,
            p.connected_addrs.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let s = Client::new(args.api.api).status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &s.counters;
    println!(
        "peer        {} {}",
        s.peer_id,
        s.name.as_deref().unwrap_or("")
    );
    println!(
        "version     {}   uptime {:.0}s   mdns {}",
        s.version,
        s.uptime_secs,
        if s.mdns { "on" } else { "off" }
    );
    println!(
        "peers       {} connected, {} in the gossip mesh",
        s.peers, s.mesh_peers
    );
    for a in &s.listen_addrs {
        println!("listening   {a}");
    }
    println!(
        "events      {} published, {} received",
        c.published, c.received
    );
    println!(
        "dropped     {} malformed messages, {} rejected events, {} handler queue full",
        c.messages_malformed, c.events_rejected, c.handler_queue_full
    );
    println!(
        "handlers    {} rows, {} ok, {} failed",
        s.handlers.len(),
        c.handler_succeeded,
        c.handler_failed
    );
    Ok(ExitCode::SUCCESS)
}

async fn handlers(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let rows = Client::new(args.api.api).handlers().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<16} {:<28} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8}  LAST ERROR",
        "NAME",
        "PATTERN",
        "ACTION",
        "MATCHED",
        "OK",
        "FAILED",
        "RETRY",
        "DEAD",
        "BUSY",
        "QUEUE",
        "DROP",
        "P99 ms"
    );
    for r in rows {
        let mut action = r.action.clone();
        if action.chars().count() > 28 {
            action = action.chars().take(27).collect::<String>() + "…";
        }
        println!(
            "{:<12} {:<16} {:<28} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8.2}  {}",
            r.name,
            r.pattern,
            action,
            r.matched,
            r.succeeded,
            r.failed,
            r.retried,
            r.dead_lettered,
            r.in_flight,
            r.queue_depth,
            r.queue_full,
            r.latency.p99_us as f64 / 1000.0,
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}
