//! A virtual LAN on one Linux machine: one network namespace per host, each joined by a veth
//! pair to a bridge that lives in a namespace of its own. Multicast (mDNS) stays inside it.
//!
//! Needs root and iproute2's `ip`. Names are unique per lab (process id and a counter), so
//! several labs can run side by side; dropping a [`VirtualLan`] kills what runs in its
//! namespaces and removes them, also when a test panics.
//!
//! ```text
//!   ns {prefix}-h0          ns {prefix}-br              ns {prefix}-h1
//!   eth0 10.77.0.1/16 ──veth── v0 ┐             ┌ v1 ──veth── eth0 10.77.0.2/16
//!                                 └──── br0 ────┘   …
//! ```

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Subnet of every lab: the hosts are 10.77.0.1, 10.77.0.2, …
pub const SUBNET_PREFIX_LEN: u8 = 16;

/// Most hosts in one lab.
pub const MAX_HOSTS: usize = 250 * 250;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A command of `ip` that failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {reason}")]
pub struct NetnsError {
    /// The command line.
    pub command: String,
    /// Its stderr, or why it could not run.
    pub reason: String,
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    /// Its address on the LAN.
    pub addr: Ipv4Addr,
}

/// A bridge and its hosts. Dropping it tears everything down.
#[derive(Debug)]
pub struct VirtualLan {
    prefix: String,
    hosts: Vec<Host>,
    /// Set by [`VirtualLan::keep`]: the lab outlives this value.
    kept: bool,
}

/// Runs `ip ARGS…`, turning a failure into an error that shows the command.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetnsError {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process can build labs; the error says why not.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("network namespaces need root".into());
    }
    let probe = format!(
        "mbprobe-{}x{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    );
    ip(&["netns", "add", &probe]).map_err(|e| e.to_string())?;
    ip(&["netns", "del", &probe]).map_err(|e| e.to_string())?;
    Ok(())
}

/// A lab prefix that no other lab on this machine uses while this process runs: the process
/// id and a counter.
pub fn unique_prefix() -> String {
    format!(
        "mb{}x{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    )
}

impl VirtualLan {
    /// Builds a lab of `hosts` hosts with a name unique to this process.
    pub fn create(hosts: usize) -> Result<Self, NetnsError> {
        Self::with_prefix(&unique_prefix(), hosts)
    }

    /// Builds a lab whose namespaces are named `{prefix}-br` and `{prefix}-h{i}`.
    pub fn with_prefix(prefix: &str, hosts: usize) -> Result<Self, NetnsError> {
        assert!(hosts <= MAX_HOSTS, "a lab holds at most {MAX_HOSTS} hosts");
        let mut lan = VirtualLan {
            prefix: prefix.to_owned(),
            hosts: Vec::new(),
            kept: false,
        };
        neighbour_room(hosts)?;
        let br = lan.bridge_netns();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            lan.add_host(i)?;
        }
        Ok(lan)
    }

    fn add_host(&mut self, i: usize) -> Result<(), NetnsError> {
        let br = self.bridge_netns();
        let netns = format!("{}-h{i}", self.prefix);
        let addr = Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8);
        ip(&["netns", "add", &netns])?;
        self.hosts.push(Host {
            netns: netns.clone(),
            addr,
        });
        let port = format!("v{i}");
        let cidr = format!("{addr}/{SUBNET_PREFIX_LEN}");
        ip(&[
            "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        // Multicast (mDNS to 224.0.0.251) needs a route; give it one on the LAN only.
        ip(&["-n", &netns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        Ok(())
    }

    /// The namespace holding the bridge.
    pub fn bridge_netns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The lab's hosts, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        exec(&self.hosts[i].netns, program)
    }

    /// Unplugs host `i` from the bridge (its processes keep running).
    pub fn cut(&self, i: usize) -> Result<(), NetnsError> {
        cut(&self.prefix, i)
    }

    /// Plugs host `i` back in.
    pub fn heal(&self, i: usize) -> Result<(), NetnsError> {
        heal(&self.prefix, i)
    }

    /// Lets the lab outlive this value (a later [`remove_lab`] takes it down).
    pub fn keep(mut self) -> Vec<Host> {
        self.kept = true;
        std::mem::take(&mut self.hosts)
    }
}

impl Drop for VirtualLan {
    fn drop(&mut self) {
        if !self.kept {
            remove_lab(&self.prefix);
        }
    }
}

/// The kernel's IPv4 neighbour (ARP) table limits: one table for every namespace.
const NEIGH_SYSCTL: &str = "/proc/sys/net/ipv4/neigh/default";

/// The kernel's default hard limit of the ARP table (`gc_thresh3`).
const NEIGH_DEFAULT_LIMIT: usize = 1024;

/// Entries kept free for the rest of the machine (the host and other labs).
const NEIGH_HEADROOM: usize = 512;

/// Makes room in the kernel's ARP table for a lab of `hosts` hosts whose peers all talk to
/// one another: `hosts × (hosts − 1)` entries. The table is one for the whole machine, and
/// by default holds at most 1,024 (`gc_thresh3`): a 50-host lab needs 2,450, and past the
/// limit a host's first packet to another finds no ARP entry and is dropped, silently (the
/// kernel logs "neighbor table overflow"). When the hard limit is too small, it and the
/// soft one (`gc_thresh2`) are raised, never lowered, and the change is said on stderr; it
/// lasts until the machine restarts.
pub fn neighbour_room(hosts: usize) -> Result<(), NetnsError> {
    let entries = hosts * hosts.saturating_sub(1);
    let needed = entries + NEIGH_HEADROOM;
    // Within the kernel's default: nothing to read (some sandboxes do not show the file).
    if needed <= NEIGH_DEFAULT_LIMIT {
        return Ok(());
    }
    let read = |name: &str| -> Result<usize, NetnsError> {
        let path = format!("{NEIGH_SYSCTL}/{name}");
        let text = std::fs::read_to_string(&path).map_err(|e| neigh_error(&path, e.to_string()))?;
        text.trim()
            .parse()
            .map_err(|e| neigh_error(&path, format!("{text:?} is not a number: {e}")))
    };
    if read("gc_thresh3")? >= needed {
        return Ok(());
    }
    for (name, want) in [("gc_thresh2", needed), ("gc_thresh3", 2 * needed)] {
        let now = read(name)?;
        if now < want {
            let path = format!("{NEIGH_SYSCTL}/{name}");
            std::fs::write(&path, want.to_string()).map_err(|e| {
                neigh_error(
                    &path,
                    format!("{e} (a lab of {hosts} hosts needs {needed} entries)"),
                )
            })?;
            eprintln!(
                "meshbus-lab: raised net.ipv4.neigh.default.{name} from {now} to {want}: \
                 {hosts} hosts need {entries} ARP entries in the machine's one table"
            );
        }
    }
    Ok(())
}

fn neigh_error(path: &str, reason: String) -> NetnsError {
    NetnsError {
        command: format!("make room in the ARP table ({path})"),
        reason,
    }
}

/// A command that runs `program` inside namespace `netns` (`ip netns exec` replaces itself
/// with the program, so the child's pid is the program's).
pub fn exec(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    cmd
}

/// Unplugs host `i` of lab `prefix` from its bridge.
pub fn cut(prefix: &str, i: usize) -> Result<(), NetnsError> {
    let br = format!("{prefix}-br");
    ip(&["-n", &br, "link", "set", &format!("v{i}"), "down"]).map(drop)
}

/// Plugs host `i` of lab `prefix` back in.
pub fn heal(prefix: &str, i: usize) -> Result<(), NetnsError> {
    let br = format!("{prefix}-br");
    ip(&["-n", &br, "link", "set", &format!("v{i}"), "up"]).map(drop)
}

/// Kills everything in lab `prefix` and removes its namespaces, whatever state it was left
/// in (a crash included). Returns how many namespaces were removed.
pub fn remove_lab(prefix: &str) -> usize {
    let Ok(list) = ip(&["netns", "list"]) else {
        return 0;
    };
    let bridge = format!("{prefix}-br");
    let hosts = format!("{prefix}-h");
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            *n == bridge
                || n.strip_prefix(&hosts)
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    for netns in &names {
        kill_all_in(netns);
    }
    for netns in &names {
        let _ = ip(&["netns", "del", netns]);
    }
    names.len()
}

/// SIGKILLs every process in a namespace.
pub fn kill_all_in(netns: &str) {
    let Ok(pids) = ip(&["netns", "pids", netns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
