//! `ps` and `events`: what runs in a container and what it uses, as the
//! guest agent sees it. The table's PIDs are the guest's (the processes live
//! there); the JSON list, which engines use to look processes up on the
//! host, holds the host process that stands for the container.

use std::time::Duration;

use anyhow::{bail, Context};
use runvm_protocol::{GuestProcess, GuestStats};
use serde_json::json;

use crate::control::{self, Request};
use crate::lifecycle::{self, Globals};
use crate::state::{self, Root, Status};

/// `runvm ps ID`: the guest's processes as a table, or (`json`) a JSON
/// array of host PIDs as runc prints them.
///
/// Engines take that array for host PIDs: `docker top` runs the host's `ps`
/// and keeps the lines of those PIDs. Guest PIDs would pick out unrelated
/// host processes (a kernel thread, another tenant's program), so the
/// array holds the host processes that stand for the container's: its
/// monitor, for the init (the `--pid-file` PID), and each running exec's
/// caller or detached waiter (its `--pid-file` PID). The guest's processes
/// are in the table.
pub fn ps(g: &Globals, id: &str, format: &str) -> anyhow::Result<String> {
    match format {
        "json" => {
            let dir = Root::new(&g.root).open(id)?;
            match dir.load_live()?.status {
                Status::Created | Status::Running | Status::Paused => {}
                s => bail!("container {id} is not running (state {s})"),
            }
            let reply = control::call(
                &dir.file(state::CONTROL_SOCKET),
                &Request::HostPids,
                lifecycle::CONTROL_TIMEOUT,
            )?;
            let pids = reply.host_pids.context("the monitor sent no PIDs")?;
            Ok(format!("{}\n", serde_json::to_string(&pids)?))
        }
        "table" => {
            let reply = lifecycle::query(g, id, &Request::Ps)?;
            let procs = reply
                .processes
                .context("the monitor sent no process list")?;
            Ok(table(&procs))
        }
        other => bail!("invalid format {other:?}: table or json"),
    }
}

fn table(procs: &[GuestProcess]) -> String {
    let mut out = format!(
        "{:<8} {:>7} {:>7} {:<4} {}\n",
        "UID", "PID", "PPID", "STAT", "CMD"
    );
    for p in procs {
        out.push_str(&format!(
            "{:<8} {:>7} {:>7} {:<4} {}\n",
            p.uid, p.pid, p.ppid, p.state, p.cmd
        ));
    }
    out
}

/// runc's `events` stats record for `stats`: the container cgroup's figures
/// where the guest has one (as runc reports its cgroup's), else the whole
/// guest's. Per-CPU time is the guest's vCPUs' either way (cgroup v2 has
/// none per CPU).
fn stats_event(id: &str, s: &GuestStats) -> serde_json::Value {
    let usage = |n: u64| json!({"usage": n, "limit": 0, "max": 0, "failcnt": 0});
    if let Some(c) = &s.cgroup {
        return json!({
            "type": "stats",
            "id": id,
            "data": {
                "cpu": {
                    "usage": {
                        "total": c.cpu_usage_usec * 1000,
                        "percpu": s.cpu_percpu_ns,
                        "kernel": c.cpu_system_usec * 1000,
                        "user": c.cpu_user_usec * 1000,
                    },
                    "throttling": {
                        "periods": c.cpu_periods,
                        "throttledPeriods": c.cpu_throttled_periods,
                        "throttledTime": c.cpu_throttled_usec * 1000,
                    },
                },
                "memory": {
                    "usage": {
                        "usage": c.memory_current,
                        // No limit of its own: the guest's memory is.
                        "limit": c.memory_max.unwrap_or(s.memory_total),
                        "max": 0,
                        "failcnt": c.memory_limit_hits,
                    },
                    "swap": usage(0),
                    "kernel": usage(0),
                    "kernelTCP": usage(0),
                    "raw": {"oom_kill": c.oom_kills},
                },
                "pids": {"current": c.pids_current, "limit": c.pids_max.unwrap_or(0)},
                "blkio": {},
                "hugetlb": {},
                "intel_rdt": {},
                "network_interfaces": null,
            },
        });
    }
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": s.cpu_user_ns + s.cpu_kernel_ns,
                    "percpu": s.cpu_percpu_ns,
                    "kernel": s.cpu_kernel_ns,
                    "user": s.cpu_user_ns,
                },
                "throttling": {},
            },
            "memory": {
                "usage": {"usage": s.memory_used, "limit": s.memory_total, "max": 0, "failcnt": 0},
                "swap": usage(0),
                "kernel": usage(0),
                "kernelTCP": usage(0),
                "raw": {},
            },
            "pids": {"current": s.pids},
            "blkio": {},
            "hugetlb": {},
            "intel_rdt": {},
            "network_interfaces": null,
        },
    })
}

/// `runvm events [--stats] [--interval] ID`: one stats record, or one every
/// `interval` (as JSON lines) until the container stops.
pub fn events(
    g: &Globals,
    id: &str,
    once: bool,
    interval: Duration,
    mut out: impl std::io::Write,
) -> anyhow::Result<()> {
    if interval.is_zero() {
        bail!("--interval must be more than 0");
    }
    loop {
        let reply = match lifecycle::query(g, id, &Request::Stats) {
            Ok(r) => r,
            // A stream of events ends when the container does.
            Err(_) if !once && gone(g, id) => return Ok(()),
            Err(e) => return Err(e),
        };
        let stats = reply.stats.context("the monitor sent no stats")?;
        writeln!(out, "{}", stats_event(id, &stats))?;
        out.flush()?;
        if once {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

fn gone(g: &Globals, id: &str) -> bool {
    match Root::new(&g.root).open(id).and_then(|d| d.load_live()) {
        Ok(r) => r.status == Status::Stopped,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_header_and_a_row_per_process() {
        let procs = [GuestProcess {
            pid: 12,
            ppid: 1,
            uid: 0,
            state: "S".into(),
            cmd: "sleep 100".into(),
        }];
        let t = table(&procs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("UID") && lines[0].ends_with("CMD"));
        assert!(lines[1].contains(" 12 ") && lines[1].ends_with("sleep 100"));
    }

    #[test]
    fn stats_look_like_runcs() {
        let s = GuestStats {
            cpu_user_ns: 3,
            cpu_kernel_ns: 4,
            cpu_percpu_ns: vec![5, 2],
            memory_used: 10,
            memory_total: 100,
            pids: 2,
            cgroup: None,
        };
        let e = stats_event("c1", &s);
        assert_eq!(e["type"], "stats");
        assert_eq!(e["id"], "c1");
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 7);
        assert_eq!(e["data"]["cpu"]["usage"]["percpu"], json!([5, 2]));
        assert_eq!(e["data"]["memory"]["usage"]["usage"], 10);
        assert_eq!(e["data"]["memory"]["usage"]["limit"], 100);
        assert_eq!(e["data"]["pids"]["current"], 2);

        // With the container's cgroup: its figures, limits included.
        let s = GuestStats {
            cgroup: Some(runvm_protocol::CgroupStats {
                memory_current: 40,
                memory_max: None,
                memory_limit_hits: 2,
                oom_kills: 1,
                pids_current: 3,
                pids_max: Some(12),
                cpu_usage_usec: 6,
                cpu_user_usec: 4,
                cpu_system_usec: 2,
                cpu_periods: 9,
                cpu_throttled_periods: 5,
                cpu_throttled_usec: 7,
            }),
            ..s
        };
        let e = stats_event("c1", &s);
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 6000);
        assert_eq!(e["data"]["cpu"]["usage"]["kernel"], 2000);
        assert_eq!(e["data"]["cpu"]["usage"]["percpu"], json!([5, 2]));
        assert_eq!(e["data"]["cpu"]["throttling"]["throttledPeriods"], 5);
        assert_eq!(e["data"]["cpu"]["throttling"]["throttledTime"], 7000);
        assert_eq!(e["data"]["memory"]["usage"]["usage"], 40);
        // No limit of its own: the guest's memory bounds it.
        assert_eq!(e["data"]["memory"]["usage"]["limit"], 100);
        assert_eq!(e["data"]["memory"]["usage"]["failcnt"], 2);
        assert_eq!(e["data"]["memory"]["raw"]["oom_kill"], 1);
        assert_eq!(e["data"]["pids"], json!({"current": 3, "limit": 12}));
    }
}
