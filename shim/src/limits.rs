//! The OCI spec's `linux.resources` as limits on the container's cgroup in
//! the guest, and `runvm update`, which changes them on a live container.
//!
//! The VM's size comes from the same figures at create (see
//! `bundle::vm_size`); inside it the cgroup makes them exact: a memory
//! limit the guest kernel enforces (OOM kill in the container, as under
//! runc), a fractional CPU quota, a pids limit. A running VM cannot grow,
//! so an update beyond what the VM was booted with is refused.

use anyhow::{bail, Context};
use oci_spec::runtime::LinuxResources;
use runvm_protocol::{CpuMax, Resources};

use crate::bundle::GUEST_OVERHEAD_MIB;

/// The cgroup limits `r` asks for, and the settings that have no meaning
/// in a VM (left out, for a log line). Zero means "not set" and a negative
/// value "unlimited", as runc reads them.
pub fn from_oci(r: &LinuxResources) -> (Resources, Vec<&'static str>) {
    let mut out = Resources::default();
    let mut ignored = Vec::new();
    let set = |v: Option<i64>| v.filter(|&v| v != 0).map(|v| v.max(-1));
    if let Some(m) = r.memory() {
        out.memory_max = set(m.limit());
        out.memory_low = set(m.reservation());
        if m.swap().is_some_and(|s| s != 0) {
            ignored.push("memory.swap (the guest has no swap)");
        }
        if m.kernel().is_some() || m.kernel_tcp().is_some() {
            ignored.push("memory.kernel (not in cgroup v2)");
        }
    }
    if let Some(c) = r.cpu() {
        let quota = c.quota().unwrap_or(0);
        let period = c.period().filter(|&p| p != 0);
        if quota != 0 || period.is_some() {
            out.cpu_max = Some(CpuMax { quota, period });
        }
        out.cpu_weight = c.shares().filter(|&s| s != 0).map(shares_to_weight);
        if c.cpus().as_deref().is_some_and(|s| !s.is_empty())
            || c.mems().as_deref().is_some_and(|s| !s.is_empty())
        {
            ignored.push("cpu.cpus/mems (the VM's vCPUs are its cpuset)");
        }
        if c.realtime_period().is_some() || c.realtime_runtime().is_some() {
            ignored.push("cpu.realtime (no real-time group scheduling)");
        }
    }
    if let Some(p) = r.pids() {
        out.pids_max = set(Some(p.limit()));
    }
    if r.block_io().as_ref().is_some_and(|b| b.weight().is_some()) {
        ignored.push("blockIO (the guest has no block devices)");
    }
    (out, ignored)
}

/// runc's mapping of cgroup v1 CPU shares (2..262144) onto v2 weights
/// (1..10000).
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9_999) / 262_142
}

/// Refuses limits the VM cannot back: more memory than it was booted with
/// for the container, or more CPU than it has vCPUs.
pub fn check_fits(r: &Resources, vcpus: u32, mem_mib: u64) -> anyhow::Result<()> {
    let room = mem_mib.saturating_sub(GUEST_OVERHEAD_MIB) << 20;
    for (what, v) in [
        ("memory limit", r.memory_max),
        ("memory reservation", r.memory_low),
    ] {
        if let Some(v) = v.filter(|&v| v > 0 && v as u64 > room) {
            bail!(
                "{what} of {} MiB is more than the {} MiB this container's VM has for it \
                 (the VM has {mem_mib} MiB; a running VM cannot grow: recreate the container \
                 with the larger limit)",
                (v as u64).div_ceil(1 << 20),
                room >> 20
            );
        }
    }
    if let Some(CpuMax { quota, period }) = r.cpu_max {
        let period = period.unwrap_or(100_000).max(1);
        if quota > 0 && (quota as u64).div_ceil(period) > u64::from(vcpus) {
            bail!(
                "a CPU quota of {quota} per {period} microseconds is {:.2} CPUs, more than this \
                 container's VM has ({vcpus} vCPUs; a running VM cannot grow: recreate the \
                 container with the larger quota)",
                quota as f64 / period as f64
            );
        }
    }
    Ok(())
}

/// runc's `update` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpdateOpts {
    /// A JSON file of OCI linux.resources, or '-' for standard input; the
    /// options below apply on top of it.
    #[arg(short, long)]
    pub resources: Option<String>,
    /// Memory limit in bytes (suffixes k, m, g; -1 for none).
    #[arg(long, value_parser = parse_bytes, allow_hyphen_values = true)]
    pub memory: Option<i64>,
    /// Memory reservation (memory.low) in bytes.
    #[arg(long, value_parser = parse_bytes, allow_hyphen_values = true)]
    pub memory_reservation: Option<i64>,
    /// Memory plus swap: accepted and ignored (the guest has no swap).
    #[arg(long, value_parser = parse_bytes, allow_hyphen_values = true)]
    pub memory_swap: Option<i64>,
    /// Deprecated in runc, not in cgroup v2: accepted and ignored.
    #[arg(long, value_parser = parse_bytes, hide = true)]
    pub kernel_memory: Option<i64>,
    /// Deprecated in runc, not in cgroup v2: accepted and ignored.
    #[arg(long, value_parser = parse_bytes, hide = true)]
    pub kernel_memory_tcp: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds per period (-1 for none).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    /// Real-time period: accepted and ignored.
    #[arg(long)]
    pub cpu_rt_period: Option<u64>,
    /// Real-time runtime: accepted and ignored.
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs to run on: accepted and ignored (the VM's vCPUs are its cpuset).
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes: accepted and ignored.
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Maximum number of processes (-1 for none).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Block IO weight: accepted and ignored (the guest has no block devices).
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// Intel RDT: accepted and ignored.
    #[arg(long, hide = true)]
    pub l3_cache_schema: Option<String>,
    /// Intel RDT: accepted and ignored.
    #[arg(long, hide = true)]
    pub mem_bw_schema: Option<String>,
}

impl UpdateOpts {
    /// The limits to set (the resources file's, then the options'), and
    /// what was left out; `stdin` is read for `--resources -`.
    pub fn resources(
        &self,
        stdin: impl std::io::Read,
    ) -> anyhow::Result<(Resources, Vec<&'static str>)> {
        let (mut r, mut ignored) = match self.resources.as_deref() {
            None => (Resources::default(), Vec::new()),
            Some(path) => {
                let (json, from) = if path == "-" {
                    let mut s = String::new();
                    let mut stdin = stdin;
                    stdin
                        .read_to_string(&mut s)
                        .context("reading the resources from standard input")?;
                    (s, "standard input".to_string())
                } else {
                    (
                        std::fs::read_to_string(path)
                            .with_context(|| format!("cannot read resources file {path}"))?,
                        path.to_string(),
                    )
                };
                let oci: LinuxResources = serde_json::from_str(&json)
                    .with_context(|| format!("invalid linux.resources JSON in {from}"))?;
                from_oci(&oci)
            }
        };
        let set = |v: i64| if v < 0 { -1 } else { v };
        if let Some(v) = self.memory.filter(|&v| v != 0) {
            r.memory_max = Some(set(v));
        }
        if let Some(v) = self.memory_reservation.filter(|&v| v != 0) {
            r.memory_low = Some(set(v));
        }
        if self.cpu_quota.is_some() || self.cpu_period.is_some() {
            let old = r.cpu_max;
            r.cpu_max = Some(CpuMax {
                quota: self.cpu_quota.or(old.map(|c| c.quota)).unwrap_or(0),
                period: self.cpu_period.or(old.and_then(|c| c.period)),
            });
        }
        if let Some(s) = self.cpu_share.filter(|&s| s != 0) {
            r.cpu_weight = Some(shares_to_weight(s));
        }
        if let Some(v) = self.pids_limit.filter(|&v| v != 0) {
            r.pids_max = Some(set(v));
        }
        let mut skip = |cond: bool, what: &'static str| {
            if cond && !ignored.contains(&what) {
                ignored.push(what);
            }
        };
        skip(
            self.memory_swap.is_some_and(|v| v != 0),
            "memory.swap (the guest has no swap)",
        );
        skip(
            self.kernel_memory.is_some() || self.kernel_memory_tcp.is_some(),
            "memory.kernel (not in cgroup v2)",
        );
        skip(
            self.cpuset_cpus.is_some() || self.cpuset_mems.is_some(),
            "cpu.cpus/mems (the VM's vCPUs are its cpuset)",
        );
        skip(
            self.cpu_rt_period.is_some() || self.cpu_rt_runtime.is_some(),
            "cpu.realtime (no real-time group scheduling)",
        );
        skip(
            self.blkio_weight.is_some(),
            "blockIO (the guest has no block devices)",
        );
        skip(
            self.l3_cache_schema.is_some() || self.mem_bw_schema.is_some(),
            "Intel RDT (not in a VM)",
        );
        Ok((r, ignored))
    }
}

/// A byte count as runc takes it: digits with an optional binary suffix
/// (`k`, `m`, `g`, `t`, `p`, optionally followed by `b` or `ib`), or -1.
pub fn parse_bytes(s: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "-1" {
        return Ok(-1);
    }
    let bad = || format!("{s:?} is not a size in bytes (like 512m or 1g, or -1)");
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &t[digits.len()..];
    let shift = match suffix.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    let n: f64 = digits.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let bytes = n * (1u64 << shift) as f64;
    if bytes >= i64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        opts: UpdateOpts,
    }

    fn opts(args: &[&str]) -> UpdateOpts {
        Cmd::try_parse_from(std::iter::once("update").chain(args.iter().copied()))
            .unwrap()
            .opts
    }

    #[test]
    fn the_spec_resources_become_cgroup_limits() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory": {"limit": 268435456, "reservation": -1, "swap": 536870912},
                "cpu": {"quota": 150000, "period": 100000, "shares": 1024, "cpus": "0-1"},
                "pids": {"limit": 64},
                "blockIO": {"weight": 500}}"#,
        )
        .unwrap();
        let (limits, ignored) = from_oci(&r);
        assert_eq!(
            limits,
            Resources {
                memory_max: Some(268_435_456),
                memory_low: Some(-1),
                cpu_max: Some(CpuMax {
                    quota: 150_000,
                    period: Some(100_000)
                }),
                cpu_weight: Some(39),
                pids_max: Some(64),
            }
        );
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        // Docker's defaults for "no limit" set nothing.
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory": {}, "cpu": {"shares": 0}, "pids": {"limit": 0}, "devices": []}"#,
        )
        .unwrap();
        assert_eq!(from_oci(&r), (Resources::default(), vec![]));
    }

    #[test]
    fn shares_map_onto_weights_as_runc_does() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn sizes_take_runcs_suffixes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5gb"), Ok(3 << 29));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("-1"), Ok(-1));
        for bad in ["", "m", "-5", "12x", "1e400", "nan"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_apply_over_the_resources_file() {
        let json = r#"{"memory": {"limit": 134217728}, "pids": {"limit": 10}}"#;
        let o = opts(&[
            "--resources",
            "-",
            "--pids-limit",
            "20",
            "--cpu-quota",
            "50000",
        ]);
        let (r, ignored) = o.resources(json.as_bytes()).unwrap();
        assert_eq!(r.memory_max, Some(134_217_728));
        assert_eq!(r.pids_max, Some(20));
        assert_eq!(
            r.cpu_max,
            Some(CpuMax {
                quota: 50_000,
                period: None
            })
        );
        assert!(ignored.is_empty());
        let o = opts(&[
            "--memory",
            "-1",
            "--cpuset-cpus",
            "0",
            "--memory-swap",
            "1g",
        ]);
        let (r, ignored) = o.resources(std::io::empty()).unwrap();
        assert_eq!(r.memory_max, Some(-1));
        assert_eq!(ignored.len(), 2, "{ignored:?}");
    }

    #[test]
    fn a_bad_resources_file_names_itself() {
        let o = opts(&["--resources", "-"]);
        let e = o.resources(&b"{not json"[..]).unwrap_err();
        assert!(format!("{e:#}").contains("standard input"), "{e:#}");
        let o = opts(&["--resources", "/nonexistent/r.json"]);
        let e = o.resources(std::io::empty()).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/r.json"), "{e:#}");
        assert!(Cmd::try_parse_from(["update", "--memory", "lots"]).is_err());
    }

    #[test]
    fn limits_beyond_the_vm_are_refused() {
        // A VM of 320 MiB has 256 MiB for the container.
        let mem = |v| Resources {
            memory_max: Some(v),
            ..Default::default()
        };
        assert!(check_fits(&mem(256 << 20), 1, 320).is_ok());
        assert!(check_fits(&mem(-1), 1, 320).is_ok());
        let e = check_fits(&mem(257 << 20), 1, 320).unwrap_err();
        assert!(e.to_string().contains("257 MiB"), "{e}");
        let cpu = |quota, period| Resources {
            cpu_max: Some(CpuMax { quota, period }),
            ..Default::default()
        };
        assert!(check_fits(&cpu(200_000, Some(100_000)), 2, 320).is_ok());
        assert!(check_fits(&cpu(-1, None), 1, 320).is_ok());
        let e = check_fits(&cpu(150_000, None), 1, 320).unwrap_err();
        assert!(e.to_string().contains("1.50 CPUs"), "{e}");
    }
}
