//! docker's default network for `runvm run IMAGE --network bridge`: a host
//! bridge (`runvm0`, 10.90.0.1/16) with NAT to the outside, and per
//! container a network namespace whose veth is on that bridge, with an
//! address of its own and a default route through the bridge. The
//! container then takes that namespace over like any other (see the
//! parent module), so the guest's NIC gets the veth's MAC, address and
//! route.
//!
//! iproute2 (`ip`) and iptables do the work, as the engines' network
//! plugins do; addresses are leased as files under
//! `/run/runvm/bridge/leases`, taken under a lock, so concurrent runs never
//! share one and a host reboot forgets them with the namespaces.

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The bridge's name.
pub const BRIDGE: &str = "runvm0";
/// The bridge's own address: the containers' gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
/// The network's prefix length.
pub const PREFIX: u8 = 16;
/// The network, as iptables takes it.
const SUBNET: &str = "10.90.0.0/16";

/// Where leases live.
fn state_dir() -> PathBuf {
    PathBuf::from("/run/runvm/bridge")
}

/// The namespace made for container `id`.
pub fn netns_name(id: &str) -> String {
    format!("runvm-{id}")
}

/// The namespace's path, as a spec names it.
pub fn netns_path(id: &str) -> PathBuf {
    Path::new("/run/netns").join(netns_name(id))
}

/// The veth end on the bridge (at most 15 characters, from the ID).
pub fn host_end(id: &str) -> String {
    // FNV-1a: stable across runs, so `rm` finds the same name.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("rvb{:012x}", hash & 0xffff_ffff_ffff)
}

/// Runs a command; its failure is an error with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An exclusive lock on the bridge's state, released when the file it
/// holds closes.
struct Locked {
    _file: File,
}

impl Locked {
    fn take() -> anyhow::Result<Self> {
        let dir = state_dir();
        fs::create_dir_all(dir.join("leases"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let f = File::create(dir.join("lock"))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the bridge's leases");
        }
        Ok(Locked { _file: f })
    }
}

/// The lowest address of the network that no lease holds (the gateway and
/// the network's first and last addresses are never given).
pub fn free_address(taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let taken: std::collections::HashSet<&Ipv4Addr> = taken.iter().collect();
    let base = u32::from(GATEWAY) & (u32::MAX << (32 - PREFIX));
    let last = base | !(u32::MAX << (32 - PREFIX));
    (u32::from(GATEWAY) + 1..last)
        .map(Ipv4Addr::from)
        .find(|a| !taken.contains(a))
}

fn leases() -> anyhow::Result<Vec<(Ipv4Addr, String)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(state_dir().join("leases"))? {
        let e = e?;
        if let Ok(ip) = e.file_name().to_string_lossy().parse::<Ipv4Addr>() {
            out.push((ip, fs::read_to_string(e.path()).unwrap_or_default()));
        }
    }
    Ok(out)
}

/// The bridge, forwarding and NAT, made once; NAT is best effort (without
/// iptables containers still reach the host).
fn ensure_bridge() -> anyhow::Result<()> {
    if run("ip", &["link", "show", BRIDGE]).is_err() {
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        let cidr = format!("{GATEWAY}/{PREFIX}");
        run("ip", &["addr", "add", &cidr, "dev", BRIDGE])?;
    }
    run("ip", &["link", "set", BRIDGE, "up"])?;
    let nat = (|| {
        let forward = "/proc/sys/net/ipv4/ip_forward";
        if fs::read_to_string(forward)?.trim() != "1" {
            fs::write(forward, "1").context("enabling IPv4 forwarding")?;
        }
        let rules: [(&str, &str, &[&str]); 3] = [
            (
                "nat",
                "POSTROUTING",
                &["-s", SUBNET, "!", "-o", BRIDGE, "-j", "MASQUERADE"],
            ),
            // Ahead of a DROP policy (docker sets one on FORWARD).
            ("filter", "FORWARD", &["-i", BRIDGE, "-j", "ACCEPT"]),
            ("filter", "FORWARD", &["-o", BRIDGE, "-j", "ACCEPT"]),
        ];
        for (table, chain, rule) in rules {
            let mut check = vec!["-w", "-t", table, "-C", chain];
            check.extend(rule);
            if run("iptables", &check).is_err() {
                let mut add = vec!["-w", "-t", table, "-I", chain, "1"];
                add.extend(rule);
                run("iptables", &add)?;
            }
        }
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = nat {
        crate::logger::warn(&format!(
            "bridge network: no NAT to the outside ({e:#}); containers reach the host only"
        ));
    }
    Ok(())
}

/// Gives container `id` a namespace on the bridge; returns its path and
/// address. On failure nothing of it is left.
pub fn attach(id: &str) -> anyhow::Result<(PathBuf, Ipv4Addr)> {
    let _lock = Locked::take()?;
    ensure_bridge().context("setting up the bridge network")?;
    let leases = leases()?;
    if leases.iter().any(|(_, owner)| owner == id) {
        bail!("container {id} already has an address on {BRIDGE}");
    }
    let taken: Vec<Ipv4Addr> = leases.iter().map(|(ip, _)| *ip).collect();
    let ip = free_address(&taken).with_context(|| format!("no free address left on {BRIDGE}"))?;
    let lease = state_dir().join("leases").join(ip.to_string());
    File::create_new(&lease)
        .and_then(|mut f| f.write_all(id.as_bytes()))
        .with_context(|| format!("cannot write {}", lease.display()))?;
    let made = plumb(id, ip);
    if let Err(e) = made {
        unplumb(id);
        let _ = fs::remove_file(&lease);
        return Err(e.context(format!("connecting container {id} to {BRIDGE}")));
    }
    Ok((netns_path(id), ip))
}

fn plumb(id: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let ns = netns_name(id);
    let host = host_end(id);
    run("ip", &["netns", "add", &ns])?;
    run(
        "ip",
        &[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    )?;
    run("ip", &["link", "set", &host, "master", BRIDGE, "up"])?;
    let cidr = format!("{ip}/{PREFIX}");
    let gw = GATEWAY.to_string();
    for args in [
        &["addr", "add", &cidr, "dev", "eth0"][..],
        &["link", "set", "eth0", "up"],
        &["link", "set", "lo", "up"],
        &["route", "add", "default", "via", &gw],
    ] {
        let mut a = vec!["-n", &ns];
        a.extend(args);
        run("ip", &a)?;
    }
    Ok(())
}

/// Deletes the namespace (its veth goes with it) and the bridge end, if
/// still there.
fn unplumb(id: &str) {
    let _ = run("ip", &["netns", "del", &netns_name(id)]);
    let _ = run("ip", &["link", "del", &host_end(id)]);
}

/// Undoes [`attach`] for container `id`, if it was attached; best effort,
/// as it also cleans up after failures.
pub fn detach(id: &str) {
    let owned = match leases() {
        Ok(l) => l
            .into_iter()
            .filter(|(_, owner)| owner == id)
            .collect::<Vec<_>>(),
        Err(_) => return,
    };
    if owned.is_empty() {
        return;
    }
    let _lock = Locked::take();
    unplumb(id);
    for (ip, _) in owned {
        let _ = fs::remove_file(state_dir().join("leases").join(ip.to_string()));
    }
}

/// The resolver configuration the container gets, as docker makes it: the
/// host's, without name servers on the host's loopback (which the
/// container cannot reach), or public ones if none is left.
pub fn resolv_conf(host: &str) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(ip)) => {
                let local = ip
                    .parse::<std::net::IpAddr>()
                    .map_or(true, |ip| ip.is_loopback());
                if local {
                    continue;
                }
                servers += 1;
            }
            (Some("search" | "options" | "domain"), _) => {}
            _ => continue,
        }
        out.push_str(line.trim());
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

/// The host's resolver configuration: systemd-resolved's upstream one
/// where the usual file points at its local stub.
pub fn host_resolv_conf() -> String {
    let stub = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if stub.contains("127.0.0.53") {
        if let Ok(upstream) = fs::read_to_string("/run/systemd/resolve/resolv.conf") {
            return upstream;
        }
    }
    stub
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_leased_lowest_first_and_never_the_gateway() {
        assert_eq!(free_address(&[]), Some(Ipv4Addr::new(10, 90, 0, 2)));
        let taken = [Ipv4Addr::new(10, 90, 0, 2), Ipv4Addr::new(10, 90, 0, 4)];
        assert_eq!(free_address(&taken), Some(Ipv4Addr::new(10, 90, 0, 3)));
        let all: Vec<Ipv4Addr> = (2..=0xfffe_u32)
            .map(|n| Ipv4Addr::from(u32::from(GATEWAY) - 1 + n))
            .collect();
        assert_eq!(
            free_address(&all),
            None,
            "the broadcast address is not given"
        );
    }

    #[test]
    fn names_fit_and_stay_the_same() {
        let a = host_end("a-very-long-container-name-indeed");
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, host_end("a-very-long-container-name-indeed"));
        assert_ne!(a, host_end("another"));
        assert_eq!(netns_path("c1"), Path::new("/run/netns/runvm-c1"));
    }

    #[test]
    fn the_hosts_resolver_loses_its_loopback_servers() {
        assert_eq!(
            resolv_conf("# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch corp\n"),
            "nameserver 10.0.0.2\nsearch corp\n"
        );
        assert_eq!(
            resolv_conf("nameserver ::1\noptions edns0\n"),
            "options edns0\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
    }
}
