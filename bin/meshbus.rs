//! `meshbus`: run a peer, publish, tail, and look at the mesh.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt as _;
use meshbus::api::access::{self, TOKEN_ENV};
use meshbus::api::{view, Access, Client, PublishRequest};
use meshbus::config::{self, API_ENV};
use meshbus::keyring::{Keyring, MeshKey};
use meshbus::{CloudEvent, HandlerSpec, Multiaddr, Node, Pattern, Tailed};

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
    /// Ask the mesh: publish a query and print the answers as they arrive, one line per
    /// answering peer (rows with `reply = true` answer). Exits 1 when no answer came.
    Query(QueryArgs),
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
    /// Print the line another machine joins this mesh with (makes the mesh key if the data
    /// dir has none yet). Anyone holding the line can join: send it privately.
    Invite(DataDirArg),
    /// Store an invitation from `meshbus invite`, so the next `up` on this data dir joins
    /// that mesh (replaces the keys held).
    Join {
        /// The line `meshbus invite` printed; `-` reads it from standard input (a line on
        /// the command line is visible to other users in `ps`).
        line: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Show or change the mesh keys (a running peer follows the change on its next
    /// connection). To rotate without downtime: `install` the new key on every peer, then
    /// `use` it on every peer, then `remove` the old one on every peer.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// List the keys by fingerprint, primary first.
    List,
    /// Print a new random key (it is not installed).
    Generate,
    /// Accept KEY on incoming connections too.
    Install {
        /// The key, as `keys generate` printed it; `-` reads it from standard input.
        key: String,
    },
    /// Make KEY (the key or its fingerprint) primary: new connections are made with it.
    Use {
        /// The key or its fingerprint.
        key: String,
    },
    /// Stop accepting KEY (the key or its fingerprint); never the primary.
    Remove {
        /// The key or its fingerprint.
        key: String,
    },
}

#[derive(Args)]
struct DataDirArg {
    /// The peer's data directory [default: $MESHBUS_DATA_DIR, else $XDG_DATA_HOME/meshbus
    /// or ~/.local/share/meshbus].
    #[arg(long, env = config::DATA_DIR_ENV, global = true)]
    data_dir: Option<std::path::PathBuf>,
}

impl DataDirArg {
    fn dir(&self) -> anyhow::Result<std::path::PathBuf> {
        match &self.data_dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(meshbus::identity::default_data_dir()?),
        }
    }
}

#[derive(Args)]
struct ApiArg {
    /// The peer's HTTP API.
    #[arg(long, env = API_ENV, default_value_t = config::DEFAULT_API)]
    api: SocketAddr,
    /// The API token [default: $MESHBUS_TOKEN, else the data dir's api.token].
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    data: DataDirArg,
}

impl ApiArg {
    /// A client for the peer's API with the token: the one given, else the data dir's.
    fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.token {
            Some(token) => Some(token.clone()),
            None => {
                let path = self.data.dir()?.join(access::TOKEN_FILE);
                match access::read_token_file(&path) {
                    Ok(token) => Some(token),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot read the API token {}", path.display())
                        })
                    }
                }
            }
        };
        Ok(Client::new(self.api).with_token(token))
    }
}

#[derive(Args)]
struct UpArgs {
    /// A name for this peer, shown in `peers`.
    #[arg(long)]
    name: Option<String>,
    /// Address to listen on (repeatable); default all IPv4 interfaces on TCP port 7421.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// Peer to dial and keep dialling (repeatable), e.g. /ip4/10.0.0.2/tcp/7421.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<Multiaddr>,
    /// Do not discover peers by mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Where to serve the HTTP API [default: $MESHBUS_API, else the file's, else
    /// 127.0.0.1:7420].
    #[arg(long)]
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
    /// Where the peer keeps its identity key and event log (default $MESHBUS_DATA_DIR, else
    /// the file's, else $XDG_DATA_HOME/meshbus or ~/.local/share/meshbus). The same
    /// directory gives the same peer id, and handlers go on where they stopped.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Run every handler row again over the events the log holds from this last stretch of
    /// time (e.g. 10m, 1h), including ones handled before.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    replay: Option<std::time::Duration>,
    /// Let anyone who reaches this peer join the mesh, read every event and publish: no
    /// mesh key. Only for a network you trust completely.
    #[arg(long)]
    open: bool,
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
struct QueryArgs {
    /// Topic, e.g. inventory.lookup.
    topic: String,
    /// Data: JSON if it parses as JSON, else a string.
    data: Option<String>,
    /// How long to wait for answers.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Ask only the reply rows of this handler group: its owner of the query answers, and
    /// the query ends at the first answer (load-balanced request/reply).
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    api: ApiArg,
    /// Print each answer as a JSON line.
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
                .unwrap_or_else(|_| "meshbus=info,warn,libp2p_gossipsub=error".into()),
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
        Cmd::Query(args) => query(args).await,
        Cmd::Peers(args) => {
            let peers = args.api.client()?.peers().await?;
            show(args.json, &peers[..], view::peers)
        }
        Cmd::Status(args) => {
            let status = args.api.client()?.status().await?;
            show(args.json, &status, view::status)
        }
        Cmd::Handlers(args) => {
            let rows = args.api.client()?.handlers().await?;
            show(args.json, &rows[..], view::handlers)
        }
        Cmd::Reload(args) => {
            let names = args.api.client()?.reload().await?;
            if args.json {
                println!("{}", serde_json::to_string(&names)?);
            } else {
                println!("reloaded: {} handler(s): {}", names.len(), names.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Invite(data) => {
            let dir = data.dir()?;
            let (ring, created) = Keyring::load_or_create(&dir)?;
            if created {
                eprintln!(
                    "meshbus: made a new mesh key in {}",
                    dir.join(meshbus::keyring::KEYS_FILE).display()
                );
            }
            println!("{}", ring.primary().invite());
            eprintln!("meshbus: on the other machine run: meshbus join LINE (anyone holding this line can join; send it privately)");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Join { line, data } => {
            let key = MeshKey::from_invite(&secret_arg(line)?)?;
            let dir = data.dir()?;
            Keyring::new(key).save(&dir)?;
            println!(
                "joined: the next `meshbus up --data-dir {}` joins the mesh with key {key}",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keys { command, data } => keys(command, &data.dir()?),
    }
}

/// A secret given as an argument, or read from standard input (one line, bounded) when the
/// argument is `-`.
fn secret_arg(arg: String) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg);
    }
    let mut line = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut line)
        .context("cannot read the secret from standard input")?;
    Ok(line.trim().to_owned())
}

/// `meshbus keys …`: reads and changes the data dir's keyring.
fn keys(command: KeysCmd, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let load = || -> anyhow::Result<Keyring> {
        Keyring::load(dir)?.with_context(|| {
            format!(
                "no mesh keys in {} (`meshbus up` or `meshbus invite` makes them)",
                dir.display()
            )
        })
    };
    match command {
        KeysCmd::List => {
            let ring = load()?;
            for (i, key) in ring.keys().iter().enumerate() {
                println!("{key}{}", if i == 0 { "  primary" } else { "" });
            }
        }
        KeysCmd::Generate => println!("{}", MeshKey::generate().encode()),
        KeysCmd::Install { key } => {
            let key = MeshKey::parse(&secret_arg(key)?)?;
            let mut ring = load()?;
            let added = ring.install(key)?;
            ring.save(dir)?;
            println!(
                "{} {key}",
                if added {
                    "installed"
                } else {
                    "already installed:"
                }
            );
        }
        KeysCmd::Use { key } => {
            let mut ring = load()?;
            let key = ring.make_primary(&key)?;
            ring.save(dir)?;
            println!("primary: {key}");
        }
        KeysCmd::Remove { key } => {
            let mut ring = load()?;
            let key = ring.remove(&key)?;
            ring.save(dir)?;
            println!("removed {key}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Raises the open-file limit to what the system allows: a peer holds sockets for its
/// connections, the API and its handlers, and the common soft limit of 1,024 is low.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    raise_file_limit();
    let resolved = config::resolve(config::Flags {
        name: args.name,
        listen: args.listen,
        peers: args.peers,
        no_mdns: args.no_mdns,
        api: args.api,
        config: args.config,
        on: args.on,
        quiet: args.quiet,
        max_event_size: args.max_event_size,
        exec_timeout: args.exec_timeout.map(std::time::Duration::from_secs),
        data_dir: args.data_dir,
        replay: args.replay,
        open: args.open,
    })?;
    if !resolved.api.ip().is_loopback() {
        tracing::warn!(api = %resolved.api, "the API listens beyond this machine: anyone who can reach it and holds a token can use it; the token is {}", resolved.identity.dir.join(access::TOKEN_FILE).display());
    }
    let listener = tokio::net::TcpListener::bind(resolved.api)
        .await
        .with_context(|| {
            format!(
                "cannot serve the API on {} (is another peer running? choose another address with --api)",
                resolved.api
            )
        })?;
    let node = Node::start(resolved.node)
        .await
        .context("cannot start the peer")?;
    let table = resolved.table;
    node.set_reload_source(move || table.load());
    let access = Access::new(resolved.tokens.clone());
    let api = meshbus::api::Server::spawn(listener, node.handle(), access)?;
    let status = node.status().await?;
    let mut err = std::io::stderr().lock();
    writeln!(err, "meshbus: peer {} is up", status.peer_id)?;
    writeln!(err, "meshbus: api http://{}", api.local_addr())?;
    for addr in &status.listen_addrs {
        writeln!(err, "meshbus: listening on {addr}")?;
    }
    writeln!(err, "meshbus: data dir {}", resolved.identity.dir.display())?;
    let dir = resolved.identity.dir.display();
    match &resolved.keys {
        Some((ring, created)) => {
            if *created {
                writeln!(err, "meshbus: made a new mesh key in {dir}/{}", meshbus::keyring::KEYS_FILE)?;
            }
            writeln!(err, "meshbus: private mesh, key {}; `meshbus invite` prints the line another machine joins with", ring.primary())?;
        }
        None => writeln!(err, "meshbus: OPEN MESH (--open): anyone who reaches this peer can join, read every event and publish")?,
    }
    writeln!(
        err,
        "meshbus: api token in {dir}/{} (the CLI reads it from there)",
        access::TOKEN_FILE
    )?;
    if !resolved.api.ip().is_loopback() {
        writeln!(err, "meshbus: WARNING: the API on {} is reachable from the network; it answers only to holders of a token ({dir}/{})", resolved.api, access::TOKEN_FILE)?;
    }
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
    api.shutdown().await;
    node.shutdown().await;
    drop(resolved.identity);
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
    let request = PublishRequest::new(args.topic, args.event_type, payload.as_ref())?;
    let published = args.api.client()?.publish(&request).await?;
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

async fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    use meshbus::api::{QueryLine, QueryRequest};
    let payload = args.data.as_deref().map(meshbus::Payload::guess);
    let published = PublishRequest::new(args.topic.clone(), None, payload.as_ref())?;
    let request = QueryRequest {
        topic: args.topic,
        datacontenttype: published.datacontenttype,
        data: published.data,
        timeout_ms: Some(args.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
        group: args.group,
    };
    let stream = args.api.client()?.query(&request).await?;
    futures::pin_mut!(stream);
    let mut out = std::io::stdout();
    let mut answers = 0;
    while let Some(line) = stream.next().await {
        match line? {
            QueryLine::Answer(answer) => {
                answers += 1;
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&answer)?)?;
                } else {
                    writeln!(out, "{}", view::answer(&answer))?;
                }
                out.flush()?;
            }
            QueryLine::Done {
                asked, answers: n, ..
            } => {
                if n == 0 {
                    let peers = if asked == 1 { "peer" } else { "peers" };
                    eprintln!("no answers from {asked} {peers}");
                    return Ok(ExitCode::from(1));
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    if answers == 0 {
        bail!("the peer ended the query without saying how it ended");
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    Pattern::new(args.pattern.as_str())?;
    let stream = args.api.client()?.events(&args.pattern).await?;
    futures::pin_mut!(stream);
    let mut seen = 0;
    let mut out = std::io::stdout();
    while args.count.is_none_or(|n| seen < n) {
        let Some(item) = stream.next().await else {
            bail!("the peer closed the event stream");
        };
        match item? {
            Tailed::Event(json) => {
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
            Tailed::Missed(n) => eprintln!("meshbus: missed {n} events (reading too slowly)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints an answer as pretty JSON, or through its plain-text view.
fn show<T: serde::Serialize + ?Sized>(
    json: bool,
    value: &T,
    view: fn(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", view(value));
    }
    Ok(ExitCode::SUCCESS)
}
