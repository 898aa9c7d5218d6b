//! What `runvm ps` and `runvm events --stats` report, read from the guest's
//! /proc: the container's processes and the guest's CPU and memory use.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use runvm_protocol::{GuestProcess, GuestStats};

/// /proc/stat counts in USER_HZ ticks, which Linux fixes at 100 per second
/// for user space whatever the kernel's HZ.
const NS_PER_TICK: u64 = 10_000_000;

/// One line of /proc/PID/stat, parsed: (pid, comm, state, ppid).
fn parse_stat(text: &str) -> Option<(i32, String, String, i32)> {
    // The command name may hold spaces and parentheses: it runs from the
    // first '(' to the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.to_owned();
    let ppid = rest.next()?.parse().ok()?;
    Some((pid, comm, state, ppid))
}

/// The real UID from /proc/PID/status.
fn parse_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Every process under `proc_root` (normally /proc) that can be read; one
/// that exits meanwhile is skipped.
pub fn scan(proc_root: &Path) -> Vec<GuestProcess> {
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut all: Vec<GuestProcess> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let base = proc_root.join(pid.to_string());
            let (pid, comm, state, ppid) =
                parse_stat(&fs::read_to_string(base.join("stat")).ok()?)?;
            let uid = parse_uid(&fs::read_to_string(base.join("status")).ok()?)?;
            let raw = fs::read(base.join("cmdline")).unwrap_or_default();
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cmd = if args.is_empty() {
                format!("[{comm}]")
            } else {
                args.join(" ")
            };
            Some(GuestProcess {
                pid,
                ppid,
                uid,
                state,
                cmd,
            })
        })
        .collect();
    all.sort_by_key(|p| p.pid);
    all
}

/// The processes in `all` that descend from one of `roots` (the processes
/// the agent started) or, when `in_container` says so, belong to the
/// container otherwise (a daemon that double-forked and was reparented to
/// the agent).
pub fn container_processes(
    all: &[GuestProcess],
    roots: &[i32],
    in_container: impl Fn(i32) -> bool,
) -> Vec<GuestProcess> {
    let parent: HashMap<i32, i32> = all.iter().map(|p| (p.pid, p.ppid)).collect();
    let descends = |mut pid: i32| {
        // Bounded: a PID loop in a racy snapshot must not spin forever.
        for _ in 0..all.len() + 1 {
            if roots.contains(&pid) {
                return true;
            }
            match parent.get(&pid) {
                Some(&pp) if pp > 0 && pp != pid => pid = pp,
                _ => return false,
            }
        }
        false
    };
    all.iter()
        .filter(|p| descends(p.pid) || in_container(p.pid))
        .cloned()
        .collect()
}

/// The guest's figures from /proc/stat and /proc/meminfo under `proc_root`.
pub fn stats(proc_root: &Path, pids: u64) -> std::io::Result<GuestStats> {
    let stat = fs::read_to_string(proc_root.join("stat"))?;
    let meminfo = fs::read_to_string(proc_root.join("meminfo"))?;
    let mut s = parse_cpu(&stat);
    let (total, available) = parse_meminfo(&meminfo);
    s.memory_total = total;
    s.memory_used = total.saturating_sub(available);
    s.pids = pids;
    Ok(s)
}

/// CPU figures from /proc/stat: `cpu user nice system idle iowait irq
/// softirq steal ...`, in ticks.
fn parse_cpu(stat: &str) -> GuestStats {
    let mut s = GuestStats::default();
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        if !name.starts_with("cpu") {
            continue;
        }
        let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let user = at(0) + at(1);
        let kernel = at(2) + at(5) + at(6);
        if name == "cpu" {
            s.cpu_user_ns = user * NS_PER_TICK;
            s.cpu_kernel_ns = kernel * NS_PER_TICK;
        } else {
            s.cpu_percpu_ns.push((user + kernel) * NS_PER_TICK);
        }
    }
    s
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32) -> GuestProcess {
        GuestProcess {
            pid,
            ppid,
            uid: 0,
            state: "S".into(),
            cmd: format!("p{pid}"),
        }
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        assert_eq!(
            parse_stat("42 (a) b)) S 7 42 42 0 -1"),
            Some((42, "a) b)".into(), "S".into(), 7))
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x"), None);
        assert_eq!(
            parse_uid("Name:\tsh\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
    }

    #[test]
    fn the_container_is_what_descends_from_its_processes() {
        // 1 agent, 10 container init, 11 its child, 12 grandchild,
        // 20 the agent's helper, 30 a daemon reparented to the agent.
        let all = [p(1, 0), p(10, 1), p(11, 10), p(12, 11), p(20, 1), p(30, 1)];
        let got: Vec<i32> = container_processes(&all, &[10], |pid| pid == 30)
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(got, [10, 11, 12, 30]);
        // A parent loop in a racy snapshot ends.
        let looped = [p(5, 6), p(6, 5)];
        assert!(container_processes(&looped, &[10], |_| false).is_empty());
    }

    #[test]
    fn cpu_and_memory_figures_parse() {
        let s = parse_cpu(
            "cpu  100 5 50 1000 7 3 2 0 0 0\ncpu0 60 5 30 500 0 2 1 0 0 0\ncpu1 40 0 20 500 7 1 1 0 0 0\nintr 1\n",
        );
        assert_eq!(s.cpu_user_ns, 105 * NS_PER_TICK);
        assert_eq!(s.cpu_kernel_ns, 55 * NS_PER_TICK);
        assert_eq!(s.cpu_percpu_ns, [98 * NS_PER_TICK, 62 * NS_PER_TICK]);
        assert_eq!(
            parse_meminfo("MemTotal:       2048 kB\nMemFree: 1 kB\nMemAvailable:   1024 kB\n"),
            (2048 * 1024, 1024 * 1024)
        );
    }

    #[test]
    fn this_hosts_proc_reads() {
        let all = scan(Path::new("/proc"));
        let me = std::process::id() as i32;
        let mine = all.iter().find(|p| p.pid == me).expect("this process");
        assert!(mine.cmd.contains("runvm_agent") || !mine.cmd.is_empty());
        let s = stats(Path::new("/proc"), 1).unwrap();
        assert!(s.memory_total > 0 && s.memory_used > 0);
        assert!(!s.cpu_percpu_ns.is_empty());
        assert!(s.cpu_user_ns + s.cpu_kernel_ns > 0);
    }
}
