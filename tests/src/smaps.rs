//! A process's mappings as `/proc/PID/smaps` lists them: the one parser the
//! boot benchmark and the huge-page tests share.

/// One mapping: the path of its header line (empty for anonymous memory)
/// and the `Key: value` lines under it.
#[derive(Debug)]
pub struct Mapping<'a> {
    /// The mapped file, or empty.
    pub path: &'a str,
    body: Vec<&'a str>,
}

impl<'a> Mapping<'a> {
    /// A `Key: N kB` field, in KiB.
    pub fn kib(&self, key: &str) -> Option<u64> {
        self.body.iter().find_map(|l| field_kib(l, key))
    }

    /// The VmFlags words.
    pub fn flags(&self) -> &'a str {
        self.body
            .iter()
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_default()
            .trim()
    }
}

/// The mappings of one smaps text, in order.
pub fn mappings(smaps: &str) -> Vec<Mapping<'_>> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first
            .split_once('-')
            .is_some_and(|(a, b)| is_hex(a) && is_hex(b))
        {
            // "start-end perms offset dev inode [path]"
            out.push(Mapping {
                path: words.nth(4).unwrap_or_default(),
                body: Vec::new(),
            });
        } else if let Some(m) = out.last_mut() {
            m.body.push(line);
        }
    }
    out
}

/// `line`'s value in KiB when it is the `key` field ("Rss:   12 kB").
pub fn field_kib(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .strip_prefix(':')?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The VmFlags of each mapping of `pid`'s guest RAM memfd
/// (`/memfd:runvm-guest-ram`), one string per mapping.
pub fn guest_ram_flags(pid: u32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps: {e}"));
    let flags: Vec<String> = mappings(&smaps)
        .iter()
        .filter(|m| m.path == "/memfd:runvm-guest-ram")
        .map(|m| m.flags().to_owned())
        .collect();
    assert!(!flags.is_empty(), "no guest RAM mapping in smaps:\n{smaps}");
    flags
}

/// Whether a mapping's VmFlags carry the transparent huge page advice.
pub fn advised(flags: &str) -> bool {
    flags.split_whitespace().any(|w| w == "hg")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123   /usr/bin/x
Rss:                   4 kB
VmFlags: rd mr mw me
7f0000000000-7f0008000000 rw-s 00000000 00:01 9     /memfd:runvm-guest-ram (deleted)
Rss:               12288 kB
ShmemPmdMapped:    10240 kB
VmFlags: rd wr sh mr mw me ms hg
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn mappings_carry_their_path_fields_and_flags() {
        let m = mappings(SMAPS);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/x");
        assert_eq!(m[1].path, "/memfd:runvm-guest-ram");
        assert_eq!(m[1].kib("Rss"), Some(12288));
        assert_eq!(m[1].kib("ShmemPmdMapped"), Some(10240));
        assert!(advised(m[1].flags()));
        assert_eq!(m[2].path, "");
        assert!(!advised(m[2].flags()));
        assert_eq!(field_kib("Rss:  7 kB", "Rss"), Some(7));
        assert_eq!(field_kib("RssAnon:  7 kB", "Rss"), None);
    }
}
