//! The spec's PID, IPC and UTS namespaces, its masked and read-only
//! paths and its sysctls, for the agent: the container's init makes them
//! in the guest as it starts, so the container sees itself as it would
//! under runc (its process is PID 1, /proc shows only its processes,
//! /proc/kcore is hidden, /proc/sys is read-only).

use anyhow::{bail, Context};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use runvm_protocol::{ContainerSetup, GuestDevice, Namespace};

use crate::logger;

/// More paths than any engine writes (runc's default lists 15).
const MAX_PATHS: usize = 256;

/// What the container's init sets up; `None` when the spec asks for
/// nothing of the kind.
pub fn from_spec(spec: &Spec) -> anyhow::Result<Option<ContainerSetup>> {
    let Some(linux) = spec.linux() else {
        return Ok(None);
    };
    let mut namespaces = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        let kind = match ns.typ() {
            LinuxNamespaceType::Pid => Namespace::Pid,
            LinuxNamespaceType::Ipc => Namespace::Ipc,
            LinuxNamespaceType::Uts => Namespace::Uts,
            _ => continue,
        };
        if namespaces.contains(&kind) {
            bail!("linux.namespaces lists the {} namespace twice", name(kind));
        }
        if let Some(path) = ns.path() {
            // Another container's namespace (podman's --pid container:X)
            // lives in another VM: the closest is the guest's own.
            logger::debug(&format!(
                "the {} namespace {} cannot be joined from a micro-VM: the container shares the guest's",
                name(kind),
                path.display()
            ));
            continue;
        }
        namespaces.push(kind);
    }
    let masked_paths = paths("linux.maskedPaths", linux.masked_paths().as_deref())?;
    let readonly_paths = paths("linux.readonlyPaths", linux.readonly_paths().as_deref())?;
    let sysctls = sysctls(linux.sysctl().as_ref())?;
    let devices = devices(linux.devices().as_deref())?;
    let setup = ContainerSetup {
        namespaces,
        devices,
        masked_paths,
        readonly_paths,
        sysctls,
    };
    Ok((!setup.is_empty()).then_some(setup))
}

fn name(kind: Namespace) -> &'static str {
    match kind {
        Namespace::Pid => "pid",
        Namespace::Ipc => "ipc",
        Namespace::Uts => "uts",
    }
}

/// `linux.devices`, checked: absolute paths without `..`, a known type,
/// numbers that fit. The guest kernel's device of that number is what the
/// container gets.
fn devices(list: Option<&[oci_spec::runtime::LinuxDevice]>) -> anyhow::Result<Vec<GuestDevice>> {
    use oci_spec::runtime::LinuxDeviceType;
    let list = list.unwrap_or_default();
    if list.len() > MAX_PATHS {
        bail!(
            "linux.devices has {} entries; at most {MAX_PATHS} are supported",
            list.len()
        );
    }
    list.iter()
        .map(|d| {
            let path = d
                .path()
                .to_str()
                .filter(|p| runvm_protocol::is_container_path(p))
                .with_context(|| {
                    format!(
                        "linux.devices: {} is not an absolute path without '..'",
                        d.path().display()
                    )
                })?
                .to_owned();
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => 'c',
                LinuxDeviceType::B => 'b',
                LinuxDeviceType::P => 'p',
                LinuxDeviceType::A => {
                    bail!("linux.devices: {path} has type \"a\", which names no node")
                }
            };
            let number = |n: i64, what: &str| {
                u32::try_from(n)
                    .with_context(|| format!("linux.devices: {path} has {what} number {n}"))
            };
            if d.file_mode().is_some_and(|m| m > 0o7777) {
                bail!("linux.devices: {path} has a file mode beyond 07777");
            }
            Ok(GuestDevice {
                kind,
                major: number(d.major(), "major")?,
                minor: number(d.minor(), "minor")?,
                mode: d.file_mode(),
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
                path,
            })
        })
        .collect()
}

/// `linux.sysctl`, checked: keys name files below /proc/sys, values are
/// one line. Unlike runc, which takes only keys of a namespace the
/// container has of its own, any key is allowed: the guest kernel is the
/// container's alone (the agent refuses keys that kernel lacks).
fn sysctls(
    map: Option<&std::collections::HashMap<String, String>>,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let map = map.cloned().unwrap_or_default();
    if map.len() > MAX_PATHS {
        bail!(
            "linux.sysctl has {} entries; at most {MAX_PATHS} are supported",
            map.len()
        );
    }
    for (key, value) in &map {
        if runvm_protocol::sysctl_file(key).is_none() {
            bail!("linux.sysctl: {key:?} is not a sysctl name");
        }
        if value.len() > 4096 || value.contains(['\0', '\n']) {
            bail!("linux.sysctl: the value of {key} must be one line of at most 4096 bytes");
        }
    }
    Ok(map.into_iter().collect())
}

/// Checks a path list: absolute, without `..` or NUL bytes.
fn paths(field: &str, list: Option<&[String]>) -> anyhow::Result<Vec<String>> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_PATHS {
        bail!(
            "{field} has {} entries; at most {MAX_PATHS} are supported",
            list.len()
        );
    }
    for p in list {
        if !runvm_protocol::is_container_path(p) {
            bail!("{field}: {p:?} is not an absolute path without '..'");
        }
        if p.len() > 4096 {
            bail!("{field}: a path of {} bytes is too long", p.len());
        }
    }
    Ok(list.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.2.0", "root": {{"path": "rootfs"}}, "linux": {linux}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn pid_ipc_and_uts_namespaces_are_made_and_others_left_to_the_vm() {
        let s = spec(
            r#"{"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}]}"#,
        );
        let setup = from_spec(&s).unwrap().unwrap();
        assert_eq!(
            setup.namespaces,
            [Namespace::Pid, Namespace::Ipc, Namespace::Uts]
        );
        // Only the mount and network namespaces: nothing for the init.
        let s = spec(r#"{"namespaces": [{"type": "mount"}, {"type": "network"}]}"#);
        assert_eq!(from_spec(&s).unwrap(), None);
        // A namespace to join is another container's: not made.
        let s = spec(r#"{"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}"#);
        assert_eq!(from_spec(&s).unwrap(), None);
        let s = spec(r#"{"namespaces": [{"type": "pid"}, {"type": "pid"}]}"#);
        let e = from_spec(&s).unwrap_err();
        assert!(format!("{e:#}").contains("pid namespace twice"), "{e:#}");
    }

    #[test]
    fn masked_and_read_only_paths_are_checked() {
        let s = spec(
            r#"{"maskedPaths": ["/proc/kcore", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys"]}"#,
        );
        let setup = from_spec(&s).unwrap().unwrap();
        assert_eq!(setup.masked_paths, ["/proc/kcore", "/sys/firmware"]);
        assert_eq!(setup.readonly_paths, ["/proc/sys"]);
        assert!(setup.namespaces.is_empty());
        for bad in [
            r#"{"maskedPaths": ["proc/kcore"]}"#,
            r#"{"readonlyPaths": ["/proc/../etc"]}"#,
            r#"{"maskedPaths": ["/a\u0000b"]}"#,
        ] {
            let e = from_spec(&spec(bad)).unwrap_err();
            assert!(
                format!("{e:#}").contains("not an absolute path"),
                "{bad}: {e:#}"
            );
        }
        let many: Vec<String> = (0..=MAX_PATHS).map(|i| format!("\"/p{i}\"")).collect();
        let s = spec(&format!(r#"{{"maskedPaths": [{}]}}"#, many.join(",")));
        let e = from_spec(&s).unwrap_err();
        assert!(format!("{e:#}").contains("at most"), "{e:#}");
    }

    #[test]
    fn sysctls_are_checked_and_any_key_is_allowed() {
        let s = spec(
            r#"{"sysctl": {"vm.max_map_count": "262144", "net.ipv4.ip_forward": "1",
                "kernel.shmmax": "68719476736"}}"#,
        );
        let setup = from_spec(&s).unwrap().unwrap();
        assert_eq!(
            setup.sysctls.into_iter().collect::<Vec<_>>(),
            [
                ("kernel.shmmax".to_owned(), "68719476736".to_owned()),
                ("net.ipv4.ip_forward".into(), "1".into()),
                ("vm.max_map_count".into(), "262144".into()),
            ]
        );
        for (bad, why) in [
            (
                r#"{"sysctl": {"../../etc/passwd": "x"}}"#,
                "not a sysctl name",
            ),
            (r#"{"sysctl": {"vm.max map": "1"}}"#, "not a sysctl name"),
            (r#"{"sysctl": {"vm.x": "1\nvm.y=2"}}"#, "one line"),
        ] {
            let e = from_spec(&spec(bad)).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{bad}: {e:#}");
        }
    }

    #[test]
    fn devices_are_checked() {
        let s = spec(
            r#"{"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                             "fileMode": 438, "uid": 0, "gid": 0},
                            {"path": "/dev/pipe", "type": "p"}]}"#,
        );
        let setup = from_spec(&s).unwrap().unwrap();
        assert_eq!(
            setup.devices,
            [
                GuestDevice {
                    path: "/dev/fuse".into(),
                    kind: 'c',
                    major: 10,
                    minor: 229,
                    mode: Some(0o666),
                    uid: 0,
                    gid: 0,
                },
                GuestDevice {
                    path: "/dev/pipe".into(),
                    kind: 'p',
                    ..Default::default()
                },
            ]
        );
        for (bad, why) in [
            (
                r#"{"devices": [{"path": "dev/x", "type": "c"}]}"#,
                "absolute",
            ),
            (
                r#"{"devices": [{"path": "/dev/../x", "type": "c"}]}"#,
                "absolute",
            ),
            (
                r#"{"devices": [{"path": "/dev/x", "type": "a"}]}"#,
                "names no node",
            ),
            (
                r#"{"devices": [{"path": "/dev/x", "type": "c", "major": -1}]}"#,
                "major number -1",
            ),
            (
                r#"{"devices": [{"path": "/dev/x", "type": "c", "fileMode": 65535}]}"#,
                "07777",
            ),
        ] {
            let e = from_spec(&spec(bad)).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{bad}: {e:#}");
        }
    }

    #[test]
    fn no_linux_section_sets_up_nothing() {
        let s: Spec =
            serde_json::from_str(r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}}"#).unwrap();
        assert_eq!(from_spec(&s).unwrap(), None);
    }
}
