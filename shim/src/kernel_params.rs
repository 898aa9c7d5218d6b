//! Extra words for the guest kernel's command line, from the
//! `io.runvm.kernel_params` annotation (`mitigations=off`,
//! `printk.devkmsg=on`, ...), checked so that none can change what runvm's
//! own words mean or reach the agent as a command-line flag.

use anyhow::bail;

/// Parameters runvm sets itself, or whose change cuts the host off from
/// the guest: its console (the agent's ready mark), its init, how it ends.
/// Compared after the kernel's own normalization (`-` equals `_`).
const RESERVED: &[&str] = &[
    "console",
    "init",
    "rdinit",
    "root",
    "rootfstype",
    "initrd",
    "noinitrd",
    "reboot",
    "panic",
    "8250.nr_uarts",
    "virtio_mmio.device",
];

/// Name prefixes runvm owns.
const RESERVED_PREFIXES: &[&str] = &["runvm."];

/// Longer than this is surely not a list of kernel parameters, and would
/// crowd the boot protocol's 2 KiB that the devices need too.
const MAX_LEN: usize = 1024;

/// Splits `value` (the annotation `key`) into checked words.
pub fn parse(key: &str, value: &str) -> anyhow::Result<Vec<String>> {
    if value.len() > MAX_LEN {
        bail!(
            "annotation {key} is {} bytes long; at most {MAX_LEN} are allowed",
            value.len()
        );
    }
    if let Some(c) = value
        .chars()
        .find(|&c| !(c.is_ascii_graphic() || c == ' ' || c == '\t'))
    {
        bail!("annotation {key} holds {c:?}: only printable ASCII words separated by spaces are allowed");
    }
    let mut words = Vec::new();
    for word in value.split_ascii_whitespace() {
        // The kernel reads quotes as grouping, `--` as the end of its own
        // parameters, and hands other dashed words to init (the agent) as
        // arguments.
        if word.contains('"') {
            bail!("annotation {key}: {word:?} has a quote; quoted values are not supported");
        }
        if word.starts_with('-') {
            bail!("annotation {key}: {word:?} starts with '-'; kernel parameters do not");
        }
        let name = word.split_once('=').map_or(word, |(n, _)| n);
        if name.is_empty() {
            bail!("annotation {key}: {word:?} has no parameter name");
        }
        let normal = name.replace('-', "_");
        if RESERVED.contains(&normal.as_str())
            || RESERVED_PREFIXES.iter().any(|p| normal.starts_with(p))
        {
            bail!("annotation {key}: {name} is set by runvm and cannot be changed");
        }
        words.push(word.to_owned());
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "io.runvm.kernel_params";

    #[test]
    fn words_are_split_on_spaces_and_tabs() {
        assert_eq!(
            parse(K, " mitigations=off\tprintk.devkmsg=on  nokaslr ").unwrap(),
            ["mitigations=off", "printk.devkmsg=on", "nokaslr"]
        );
        assert!(parse(K, "").unwrap().is_empty());
        assert!(parse(K, "   ").unwrap().is_empty());
    }

    #[test]
    fn runvms_own_parameters_are_refused_in_either_spelling() {
        for word in [
            "console=ttyS1",
            "init=/bin/sh",
            "rdinit=/bin/sh",
            "panic=0",
            "reboot=t",
            "virtio-mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0000000:5",
            "8250.nr-uarts=0",
            "runvm.rootfs=other",
            "runvm.rootfs_ro",
        ] {
            let e = parse(K, &format!("quiet {word}")).unwrap_err();
            assert!(format!("{e:#}").contains("set by runvm"), "{word}: {e:#}");
        }
    }

    #[test]
    fn words_that_would_leave_the_kernels_parameters_are_refused() {
        for (value, want) in [
            ("quiet -- --version", "starts with '-'"),
            ("--serve-unix /x", "starts with '-'"),
            ("foo=\"a b\"", "quote"),
            ("=x", "no parameter name"),
            ("a\nb", "printable ASCII"),
            ("caf\u{e9}", "printable ASCII"),
        ] {
            let e = parse(K, value).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{value:?}: {e:#}");
        }
        let e = parse(K, &"a ".repeat(600)).unwrap_err();
        assert!(format!("{e:#}").contains("at most 1024"), "{e:#}");
    }
}
