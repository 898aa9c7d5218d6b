//! The OCI spec's seccomp profile, compiled to BPF with seccompiler in the
//! agent and loaded by the child just before it runs the program.
//!
//! libseccomp builds one filter in which each rule carries its own action;
//! a seccompiler filter has one action for every match and one for the
//! rest. A profile therefore becomes one filter per action of its rules
//! (match: that action, otherwise allow) plus, unless the default is to
//! allow, one that lets every listed call through and gives the rest the
//! default. The kernel runs them all and keeps the strictest answer
//! (kill > trap > errno > trace > log > allow), which is the rule's own
//! action wherever a rule matches.

use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;

use runvm_protocol::{Seccomp, SeccompArg, SeccompRule};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    TargetArch,
};

/// A compiled profile: its programs, in load order, and seccomp(2) flags.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// The BPF programs.
    pub programs: Vec<BpfProgram>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: libc::c_uint,
    /// Names this architecture has no system call for (skipped, as runc
    /// does).
    pub unknown: Vec<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("seccomp: {msg}"))
}

const EPERM: u32 = libc::EPERM as u32;

/// An OCI action name with its errno or trace data.
pub fn action(name: &str, errno: Option<u32>) -> io::Result<SeccompAction> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno.unwrap_or(EPERM)),
        "SCMP_ACT_NOTIFY" => {
            return Err(invalid(
                "SCMP_ACT_NOTIFY needs a listener on the host, which a micro-VM has not".into(),
            ))
        }
        other => return Err(invalid(format!("unknown action {other:?}"))),
    })
}

fn condition(a: &SeccompArg) -> io::Result<SeccompCondition> {
    let op = match a.op.as_str() {
        "SCMP_CMP_EQ" => SeccompCmpOp::Eq,
        "SCMP_CMP_NE" => SeccompCmpOp::Ne,
        "SCMP_CMP_LT" => SeccompCmpOp::Lt,
        "SCMP_CMP_LE" => SeccompCmpOp::Le,
        "SCMP_CMP_GT" => SeccompCmpOp::Gt,
        "SCMP_CMP_GE" => SeccompCmpOp::Ge,
        "SCMP_CMP_MASKED_EQ" => SeccompCmpOp::MaskedEq(a.value),
        other => return Err(invalid(format!("unknown operator {other:?}"))),
    };
    // libseccomp compares all 64 bits, and so does this.
    let value = if a.op == "SCMP_CMP_MASKED_EQ" {
        a.value_two
    } else {
        a.value
    };
    let index = u8::try_from(a.index)
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| invalid(format!("argument index {} (0 to 5)", a.index)))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| invalid(format!("argument {}: {e}", a.index)))
}

fn flag(name: &str) -> io::Result<libc::c_uint> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_LOG" => libc::SECCOMP_FILTER_FLAG_LOG as libc::c_uint,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as libc::c_uint,
        // One thread calls exec; there is nothing to synchronise.
        "SECCOMP_FILTER_FLAG_TSYNC" => 0,
        other => return Err(invalid(format!("unknown flag {other:?}"))),
    })
}

/// The rules of one action: syscall number -> alternatives, or `None`
/// when the call matches whatever its arguments.
type Rules = BTreeMap<i64, Option<Vec<seccompiler::SeccompRule>>>;

fn add(rules: &mut Rules, nr: i64, rule: &SeccompRule) -> io::Result<()> {
    let entry = rules.entry(nr).or_insert_with(|| Some(Vec::new()));
    let Some(alternatives) = entry else {
        return Ok(());
    };
    if rule.args.is_empty() {
        *entry = None;
        return Ok(());
    }
    let conditions = rule.args.iter().map(condition).collect::<io::Result<_>>()?;
    alternatives
        .push(seccompiler::SeccompRule::new(conditions).map_err(|e| invalid(e.to_string()))?);
    Ok(())
}

/// seccompiler's form: an empty list matches unconditionally.
fn finish(rules: Rules) -> BTreeMap<i64, Vec<seccompiler::SeccompRule>> {
    rules
        .into_iter()
        .map(|(nr, alternatives)| (nr, alternatives.unwrap_or_default()))
        .collect()
}

/// Checks and compiles `profile` for this architecture.
pub fn compile(profile: &Seccomp) -> io::Result<Compiled> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| invalid(format!("architecture: {e}")))?;
    let default = action(&profile.default_action, profile.default_errno)?;
    let mut out = Compiled::default();
    for f in &profile.flags {
        out.flags |= flag(f)?;
    }
    // Per action, in first-seen order; and everything listed, for the
    // default filter.
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    let mut listed = Rules::new();
    for rule in &profile.syscalls {
        let act = action(&rule.action, rule.errno)?;
        for name in &rule.names {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                if !out.unknown.contains(name) {
                    out.unknown.push(name.clone());
                }
                continue;
            };
            let nr = nr.id() as i64;
            add(&mut listed, nr, rule)?;
            if act == SeccompAction::Allow {
                continue;
            }
            let i = match by_action.iter().position(|(a, _)| *a == act) {
                Some(i) => i,
                None => {
                    by_action.push((act.clone(), Rules::new()));
                    by_action.len() - 1
                }
            };
            add(&mut by_action[i].1, nr, rule)?;
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(SeccompFilter::new(
            finish(listed),
            default.clone(),
            SeccompAction::Allow,
            arch,
        ));
    }
    for (act, rules) in by_action {
        filters.push(SeccompFilter::new(
            finish(rules),
            SeccompAction::Allow,
            act,
            arch,
        ));
    }
    for f in filters {
        let f = f.map_err(|e| invalid(e.to_string()))?;
        out.programs
            .push(BpfProgram::try_from(f).map_err(|e| invalid(e.to_string()))?);
    }
    Ok(out)
}

/// Loads `c`'s programs into the calling thread (the child, before exec).
/// Without no_new_privs this needs CAP_SYS_ADMIN, so the child loads them
/// before it gives up its privileges, as runc does.
pub fn load(c: &Compiled) -> io::Result<()> {
    for prog in &c.programs {
        let fprog = libc::sock_fprog {
            len: prog.len() as libc::c_ushort,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SET_MODE_FILTER) reads the program `fprog`
        // points to, which lives for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                c.flags,
                std::ptr::from_ref(&fprog),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
