use runvm_protocol::{Seccomp, SeccompArg, SeccompRule};

use super::*;

fn rule(names: &[&str], action: &str) -> SeccompRule {
    SeccompRule {
        names: names.iter().map(|n| n.to_string()).collect(),
        action: action.into(),
        ..SeccompRule::default()
    }
}

/// The shape of Docker's and podman's default: deny by default, an allow
/// list, a few calls refused with their own errno.
fn docker_like() -> Seccomp {
    Seccomp {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno: Some(38),
        flags: vec![],
        syscalls: vec![
            rule(
                &["read", "write", "exit_group", "execve", "openat"],
                "SCMP_ACT_ALLOW",
            ),
            SeccompRule {
                args: vec![SeccompArg {
                    index: 0,
                    value: 0,
                    value_two: 0,
                    op: "SCMP_CMP_EQ".into(),
                }],
                ..rule(&["personality"], "SCMP_ACT_ALLOW")
            },
            SeccompRule {
                errno: Some(1),
                ..rule(&["clone3"], "SCMP_ACT_ERRNO")
            },
            rule(
                &["s390_pci_mmio_read", "arm_fadvise64_64"],
                "SCMP_ACT_ALLOW",
            ),
        ],
    }
}

#[test]
fn a_deny_by_default_profile_is_a_default_filter_plus_one_per_other_action() {
    let c = compile(&docker_like()).unwrap();
    assert_eq!(c.programs.len(), 2);
    assert!(c.programs.iter().all(|p| !p.is_empty()));
    assert_eq!(c.flags, 0);
    assert_eq!(c.unknown, ["s390_pci_mmio_read", "arm_fadvise64_64"]);
}

#[test]
fn an_allow_by_default_profile_needs_no_default_filter() {
    let p = Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        syscalls: vec![rule(&["mkdir", "mkdirat"], "SCMP_ACT_ERRNO")],
        flags: vec![
            "SECCOMP_FILTER_FLAG_LOG".into(),
            "SECCOMP_FILTER_FLAG_TSYNC".into(),
        ],
        ..Seccomp::default()
    };
    let c = compile(&p).unwrap();
    assert_eq!(c.programs.len(), 1);
    assert_eq!(c.flags, libc::SECCOMP_FILTER_FLAG_LOG as libc::c_uint);
}

#[test]
fn actions_map_to_what_libseccomp_means() {
    assert_eq!(
        action("SCMP_ACT_ERRNO", None).unwrap(),
        SeccompAction::Errno(1)
    );
    assert_eq!(
        action("SCMP_ACT_ERRNO", Some(38)).unwrap(),
        SeccompAction::Errno(38)
    );
    assert_eq!(
        action("SCMP_ACT_KILL", None).unwrap(),
        SeccompAction::KillThread
    );
    assert_eq!(
        action("SCMP_ACT_KILL_PROCESS", None).unwrap(),
        SeccompAction::KillProcess
    );
    assert_eq!(
        action("SCMP_ACT_TRACE", Some(7)).unwrap(),
        SeccompAction::Trace(7)
    );
    assert_eq!(action("SCMP_ACT_LOG", None).unwrap(), SeccompAction::Log);
    assert_eq!(action("SCMP_ACT_TRAP", None).unwrap(), SeccompAction::Trap);
}

#[test]
fn profiles_runvm_cannot_honour_are_refused_with_the_reason() {
    let bad = |p: Seccomp, want: &str| {
        let e = compile(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(want), "{e}");
    };
    let with_rule = |r: SeccompRule| Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        syscalls: vec![r],
        ..Seccomp::default()
    };
    bad(
        with_rule(rule(&["mkdir"], "SCMP_ACT_NOTIFY")),
        "needs a listener",
    );
    bad(
        with_rule(rule(&["mkdir"], "SCMP_ACT_BOGUS")),
        "unknown action",
    );
    let arg = |index: u32, op: &str| SeccompRule {
        args: vec![SeccompArg {
            index,
            value: 1,
            value_two: 0,
            op: op.into(),
        }],
        ..rule(&["kill"], "SCMP_ACT_ERRNO")
    };
    bad(with_rule(arg(0, "SCMP_CMP_ALMOST")), "unknown operator");
    bad(with_rule(arg(6, "SCMP_CMP_EQ")), "argument index 6");
    bad(
        Seccomp {
            default_action: "SCMP_ACT_NOPE".into(),
            ..Seccomp::default()
        },
        "unknown action",
    );
    bad(
        Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            flags: vec!["SECCOMP_FILTER_FLAG_NEW_LISTENER".into()],
            ..Seccomp::default()
        },
        "unknown flag",
    );
}
