//! Network namespaces and veth pairs made (and removed) by a test, for hosts that talk over real
//! interfaces. Everything here needs root and iproute2.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process: interface names have at most 15 bytes.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Why the namespace tests cannot run here, if they cannot: not root, or a tool is missing.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if !crate::is_root() {
        return Some("needs root (network namespaces, TUN)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for tool in tools {
        let found =
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed (./scripts/test.sh installs it when run as root)"));
        }
    }
    None
}

pub use crate::skip;

pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A network namespace, deleted on drop (with everything in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(&format!("cordon-{tag}-"));
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn tokio_command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c.kill_on_drop(true);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args[0]).args(&args[1..]).stdin(Stdio::null()).output().expect("ip netns exec");
        assert!(out.status.success(), "{args:?} in {} failed: {}", self.name, String::from_utf8_lossy(&out.stderr));
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Delete the interfaces first: a veth's other end (possibly in this process's namespace) goes with
        // it at once, even if some process still holds the namespace open for a moment.
        if let Ok(out) = Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string());
                if let Some(name) = name.filter(|n| !n.is_empty() && n != "lo") {
                    let _ = Command::new("ip").args(["-n", &self.name, "link", "del", &name]).status();
                }
            }
        }
        // Kill what still runs inside, then remove the namespace (its interfaces go with it).
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair between `a` and `b` (`None` = this process's namespace), with addresses in a /24.
pub fn veth(a: &Netns, a_addr: &str, b: Option<&Netns>, b_addr: &str) {
    let (a_if, b_if) = (unique("va"), unique("vb"));
    run(&["ip", "link", "add", &a_if, "type", "veth", "peer", "name", &b_if]);
    run(&["ip", "link", "set", &a_if, "netns", &a.name]);
    run(&["ip", "-n", &a.name, "addr", "add", &format!("{a_addr}/24"), "dev", &a_if]);
    run(&["ip", "-n", &a.name, "link", "set", &a_if, "up"]);
    match b {
        Some(b) => {
            run(&["ip", "link", "set", &b_if, "netns", &b.name]);
            run(&["ip", "-n", &b.name, "addr", "add", &format!("{b_addr}/24"), "dev", &b_if]);
            run(&["ip", "-n", &b.name, "link", "set", &b_if, "up"]);
        }
        None => {
            run(&["ip", "addr", "add", &format!("{b_addr}/24"), "dev", &b_if]);
            run(&["ip", "link", "set", &b_if, "up"]);
        }
    }
}

/// wireguard-go's control socket, removed on drop: a killed wireguard-go leaves it behind, and the
/// directory is shared by all namespaces.
pub struct WireguardSocket(std::path::PathBuf);

impl WireguardSocket {
    pub fn new(iface: &str) -> WireguardSocket {
        WireguardSocket(std::path::PathBuf::from(format!("/var/run/wireguard/{iface}.sock")))
    }
}

impl Drop for WireguardSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
