//! A VMM's guest RAM as its host process maps it, read from /proc.

/// The VmFlags of each mapping of `pid`'s guest RAM memfd
/// (`/memfd:runvm-guest-ram`), one string per mapping.
pub fn guest_ram_flags(pid: u32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps: {e}"));
    let mut flags = Vec::new();
    let mut in_ram = false;
    for line in smaps.lines() {
        if let Some(f) = line.strip_prefix("VmFlags:") {
            if in_ram {
                flags.push(f.trim().to_owned());
            }
        } else if line.contains(" /memfd:runvm-guest-ram") {
            in_ram = true;
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-'))
        {
            in_ram = false;
        }
    }
    assert!(!flags.is_empty(), "no guest RAM mapping in smaps:\n{smaps}");
    flags
}

/// Whether a mapping's VmFlags carry the transparent huge page advice.
pub fn advised(flags: &str) -> bool {
    flags.split_whitespace().any(|w| w == "hg")
}
