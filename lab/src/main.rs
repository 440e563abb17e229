//! `meshbus-lab`: a whole LAN of meshbus peers on one Linux machine (root), and the means to
//! break it. A thin CLI over the `meshbus_lab` library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshbus_lab::{self as lab, Lab};

#[derive(Parser)]
#[command(
    name = "meshbus-lab",
    version,
    about = "A virtual LAN of meshbus peers (needs root)"
)]
struct Cli {
    /// Names this lab: its namespaces are PREFIX-h0, PREFIX-h1, … and PREFIX-br.
    #[arg(
        long,
        global = true,
        env = "MESHBUS_LAB_PREFIX",
        default_value = "mblab"
    )]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N hosts on one bridge with a peer on each; wait for the full mesh.
    Up {
        /// How many hosts.
        #[arg(long)]
        peers: usize,
        /// Seconds to wait for the mesh.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Extra `meshbus up` arguments for every peer (after `--`); `{host}` becomes the
        /// host's name (h0, h1, …) and `{data}` its data directory.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Hosts, addresses, and each peer's view of the mesh.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a host, e.g. `exec h1 -- meshbus publish a.b 1`.
    Exec {
        /// h0, h1, …
        host: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// SIGKILL a host's peer.
    Kill {
        /// h0, h1, …
        host: String,
    },
    /// Stop a host's peer cleanly (SIGTERM: it says goodbye) and wait until it is gone.
    Stop {
        /// h0, h1, …
        host: String,
    },
    /// Start a host's peer again, with the same identity and data.
    Restart {
        /// h0, h1, …
        host: String,
    },
    /// Unplug a host from the LAN (its peer keeps running).
    Cut {
        /// h0, h1, …
        host: String,
    },
    /// Plug a host back in.
    Heal {
        /// h0, h1, …
        host: String,
    },
    /// Stop every peer and remove every namespace of this lab.
    Down,
    /// Run the mesh benchmark on a fresh lab (taken down afterwards) and print a table.
    ///
    /// Every peer handles every event with one row, `bench.**=file:/dev/null`. With
    /// `--group` that row is in a handler group (`bench`) on every peer instead, so each event
    /// is handled by one peer: the table then adds the rate at which the group as a whole
    /// finished every event, how the events split over the peers, and takeovers and
    /// duplicates.
    Bench {
        /// Peers in the lab.
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// How many of them publish.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Events in all, split among the publishers.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// Bytes of data per event.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Events per second in all (default: as fast as the peers take them).
        #[arg(long)]
        rate: Option<f64>,
        /// Put every peer's row in one handler group, `bench`: each event is handled once in
        /// the mesh, and the report adds the group's throughput as a whole and its split.
        #[arg(long)]
        group: bool,
        /// Then run the same load through a reference on the same hosts and print both and
        /// the ratio: `nats` (a `nats-server` on h0, one publisher on h0, a subscriber on
        /// every other host; needs `nats-server` installed).
        #[arg(long, value_enum)]
        compare: Option<Reference>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A scale curve: one bench per value (each on a fresh lab), one summary row each.
    ///
    /// `curve peers --values 2,5,10,20,50 --rate 1000` gives mesh formation, delivery, p99
    /// and CPU per event per peer against the number of peers; `curve size --values
    /// 64,1024,16384,262144` gives throughput and bytes/s against the event size.
    Curve {
        /// What to vary.
        #[arg(value_enum)]
        axis: lab::bench::Axis,
        /// The values, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        values: Vec<usize>,
        /// Peers, when the curve varies the size.
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// Events per point.
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        /// Bytes of data per event, when the curve varies the peers.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Events per second offered (default: as fast as the peers take them).
        #[arg(long)]
        rate: Option<f64>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// (Used by `bench` inside a host.) Publish a load through the local peer.
    #[command(hide = true)]
    BenchLoad {
        #[arg(long)]
        events: usize,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = lab::PEER_API)]
        api: std::net::SocketAddr,
    },
    /// (Used by the bench's NATS comparison inside a host.) Publish a load to a NATS server.
    #[command(hide = true)]
    NatsPub {
        #[arg(long)]
        server: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        events: usize,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        rate: Option<f64>,
    },
    /// (Used by the bench's NATS comparison inside a host.) Receive the load from a NATS
    /// server: prints `ready` once subscribed, then its figures as JSON.
    #[command(hide = true)]
    NatsSub {
        #[arg(long)]
        server: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        events: u64,
    },
}

/// What `bench --compare` measures meshbus against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Reference {
    /// NATS (`nats-server`), a broker: the fan-out reference.
    Nats,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshbus-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = lab::root();
    let prefix = cli.prefix.as_str();
    match cli.command {
        Cmd::Up {
            peers,
            timeout,
            extra,
        } => {
            lab::netns::available()
                .map_err(|reason| anyhow::anyhow!("cannot build a lab here: {reason}"))?;
            let (lab, formed) = Lab::up(
                &root,
                prefix,
                peers,
                lab::meshbus_bin(),
                extra,
                Duration::from_secs(timeout),
            )?;
            print_hosts(&lab);
            println!(
                "mesh of {peers} peers formed {:.1} ms after the last peer started",
                formed.as_secs_f64() * 1000.0
            );
        }
        Cmd::Status { json } => {
            let lab = Lab::open(&root, prefix)?;
            if json {
                let hosts: Vec<serde_json::Value> = (0..lab.state.hosts.len())
                    .map(|i| {
                        let h = &lab.state.hosts[i];
                        serde_json::json!({
                            "host": h.name, "netns": h.netns, "addr": h.addr,
                            "pid": h.pid.filter(|p| lab::process::alive(*p)),
                            "peer_id": h.peer_id, "cut": h.cut,
                            "sees": lab.peers_seen(i),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&hosts)?);
            } else {
                print_hosts(&lab);
            }
        }
        Cmd::Exec { host, command } => {
            let lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            let (program, args) = command.split_first().context("no command given")?;
            let program = if program == "meshbus" {
                lab.state.bin.clone().into_os_string()
            } else {
                program.into()
            };
            let status = lab
                .command(i, program)
                .args(args)
                .status()
                .context("cannot run the command")?;
            return Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ));
        }
        Cmd::Kill { host } => {
            let mut lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            lab.kill(i)?;
            println!("killed the peer on {host}");
        }
        Cmd::Stop { host } => {
            let mut lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            lab.stop(i)?;
            println!("stopped the peer on {host}");
        }
        Cmd::Restart { host } => {
            let mut lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            lab.restart(i)?;
            println!(
                "restarted {host} as {}",
                lab.state.hosts[i].peer_id.as_deref().unwrap_or("?")
            );
        }
        Cmd::Cut { host } => {
            let mut lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            lab.cut(i)?;
            println!("{host} is unplugged");
        }
        Cmd::Heal { host } => {
            let mut lab = Lab::open(&root, prefix)?;
            let i = lab.host(&host)?;
            lab.heal(i)?;
            println!("{host} is plugged back in");
        }
        Cmd::Bench {
            peers,
            publishers,
            events,
            size,
            rate,
            group,
            compare,
            json,
        } => {
            lab::netns::available()
                .map_err(|reason| anyhow::anyhow!("cannot build a lab here: {reason}"))?;
            anyhow::ensure!(
                (1..=peers).contains(&publishers),
                "--publishers must be between 1 and --peers ({peers})"
            );
            anyhow::ensure!(
                !(group && compare.is_some()),
                "--compare measures broadcast fan-out; it does not go with --group"
            );
            let config = lab::bench::BenchConfig {
                peers,
                publishers,
                events,
                size,
                rate,
                group,
                compare_nats: compare == Some(Reference::Nats),
            };
            let report = lab::bench::run(&root, prefix, &config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Cmd::Curve {
            axis,
            values,
            peers,
            events,
            size,
            rate,
            json,
        } => {
            lab::netns::available()
                .map_err(|reason| anyhow::anyhow!("cannot build a lab here: {reason}"))?;
            anyhow::ensure!(values.iter().all(|v| *v > 0), "--values must be positive");
            let base = lab::bench::BenchConfig {
                peers,
                publishers: 1,
                events,
                size,
                rate,
                group: false,
                compare_nats: false,
            };
            eprintln!("{}", lab::bench::CURVE_HEADER);
            let points = lab::bench::curve(&root, prefix, &base, axis, &values);
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                println!("{}", lab::bench::CURVE_HEADER);
                for p in &points {
                    println!("{}", lab::bench::curve_row(p));
                }
            }
        }
        Cmd::BenchLoad {
            events,
            size,
            topic,
            rate,
            api,
        } => {
            // The host's peer's token, from the data directory `command` names.
            let token = match std::env::var_os(meshbus::config::DATA_DIR_ENV) {
                Some(dir) => Some(meshbus::api::access::read_token_file(
                    &std::path::Path::new(&dir).join(meshbus::api::access::TOKEN_FILE),
                )?),
                None => None,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let report =
                runtime.block_on(lab::bench::load(api, token, &topic, events, size, rate))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Cmd::NatsPub {
            server,
            subject,
            events,
            size,
            rate,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report =
                runtime.block_on(lab::nats::publish(&server, &subject, events, size, rate))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Cmd::NatsSub {
            server,
            subject,
            events,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            // The bench starts the publisher once every subscriber has said this.
            let ready = || -> std::io::Result<()> {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", lab::nats::READY_LINE)?;
                out.flush()
            };
            let result =
                runtime.block_on(lab::nats::subscribe(&server, &subject, events, ready))?;
            println!("{}", serde_json::to_string(&result)?);
        }
        Cmd::Down => {
            if lab::down(&root, prefix)? {
                println!("lab {prefix} removed");
            } else {
                println!("no lab {prefix} to remove");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_hosts(lab: &Lab) {
    println!(
        "{:<5} {:<14} {:<8} {:<6} {:<54} SEES",
        "HOST", "ADDR", "PID", "STATE", "PEER ID"
    );
    for (i, h) in lab.state.hosts.iter().enumerate() {
        let running = h.pid.is_some_and(lab::process::alive);
        let state = match (running, h.cut) {
            (false, _) => "down",
            (true, true) => "cut",
            (true, false) => "up",
        };
        let sees = if running {
            lab.peers_seen(i).len().to_string()
        } else {
            "-".into()
        };
        println!(
            "{:<5} {:<14} {:<8} {:<6} {:<54} {}",
            h.name,
            h.addr,
            h.pid
                .filter(|_| running)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            state,
            h.peer_id.as_deref().unwrap_or("-"),
            sees
        );
    }
}
