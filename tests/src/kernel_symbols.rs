//! The guest kernel's function symbols (from `nm -n`), to name the
//! addresses of a `runvm-vmm --guest-profile` file.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use vmm::guest_profile::{Mode, Sample};

/// Text symbols of a vmlinux, sorted by address.
pub struct KernelSymbols {
    symbols: Vec<(u64, String)>,
    /// The kernel's text and its init text (freed once it has booted).
    text: [(u64, u64); 2],
}

impl std::fmt::Debug for KernelSymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSymbols")
            .field("symbols", &self.symbols.len())
            .field("text", &format_args!("{:x?}", self.text))
            .finish()
    }
}

impl KernelSymbols {
    /// Reads `vmlinux`'s symbols with binutils' `nm`.
    pub fn load(vmlinux: &Path) -> Result<Self, String> {
        let out = Command::new("nm")
            .args(["-n", "--defined-only"])
            .arg(vmlinux)
            .output()
            .map_err(|e| format!("cannot run nm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nm {} failed: {}",
                vmlinux.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    fn parse(nm: &str) -> Result<Self, String> {
        let mut symbols = Vec::new();
        let mut marks: [Option<u64>; 4] = [None; 4];
        for line in nm.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if let Some(i) = ["_text", "_etext", "_sinittext", "_einittext"]
                .iter()
                .position(|m| *m == name)
            {
                marks[i] = Some(addr);
            }
            if matches!(kind, "t" | "T" | "w" | "W") {
                symbols.push((addr, name.to_owned()));
            }
        }
        let [Some(text), Some(etext), Some(inittext), Some(einittext)] = marks else {
            return Err(
                "no _text, _etext, _sinittext and _einittext symbols: not a Linux vmlinux".into(),
            );
        };
        symbols.sort_by_key(|(a, _)| *a);
        Ok(Self {
            symbols,
            text: [(text, etext), (inittext, einittext)],
        })
    }

    /// Whether `rip` lies in the kernel's text or init text (not early boot
    /// code running at its physical address, not user space).
    pub fn in_text(&self, rip: u64) -> bool {
        self.text
            .iter()
            .any(|(start, end)| (*start..*end).contains(&rip))
    }

    /// The function `rip` lies in, if it is in the kernel's text.
    pub fn name(&self, rip: u64) -> Option<&str> {
        if !self.in_text(rip) {
            return None;
        }
        let i = self.symbols.partition_point(|(a, _)| *a <= rip);
        i.checked_sub(1).map(|i| self.symbols[i].1.as_str())
    }

    /// Samples per function, most first; samples outside the kernel's text
    /// count as "(user space)", "(vCPU not started)" or "(kernel, outside
    /// its text)" (early boot code runs at its physical address).
    pub fn summarize(&self, samples: &[Sample]) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for s in samples {
            let name = match (s.mode, self.name(s.rip)) {
                (Mode::User, _) => "(user space)",
                (Mode::Real, _) => "(vCPU not started)",
                (Mode::Kernel, Some(n)) => n,
                (Mode::Kernel, None) => "(kernel, outside its text)",
            };
            *counts.entry(name).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> =
            counts.into_iter().map(|(n, c)| (n.to_owned(), c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const NM: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff810fe048 T free_reserved_area
ffffffff810fe200 t helper
ffffffff81800000 T _etext
ffffffff81800000 D some_data
ffffffff81900000 T _sinittext
ffffffff81902080 T text_poke_early
ffffffff81a00000 T _einittext
";

    fn at(mode: Mode, rip: u64) -> Sample {
        Sample {
            vcpu: 0,
            elapsed: Duration::ZERO,
            mode,
            rip,
        }
    }

    #[test]
    fn addresses_name_the_function_they_fall_in() {
        let k = KernelSymbols::parse(NM).unwrap();
        assert_eq!(k.name(0xffff_ffff_810f_e0db), Some("free_reserved_area"));
        assert_eq!(k.name(0xffff_ffff_810f_e200), Some("helper"));
        assert_eq!(k.name(0xffff_ffff_8190_2092), Some("text_poke_early"));
        assert_eq!(k.name(0xffff_ffff_8180_0010), None, "data is not text");
        assert_eq!(k.name(0xffff_ffff_81a0_0000), None, "past the init text");
        assert_eq!(
            k.name(0x100_004f),
            None,
            "early code at its physical address"
        );
        let summary = k.summarize(&[
            at(Mode::Kernel, 0xffff_ffff_810f_e0db),
            at(Mode::Kernel, 0xffff_ffff_810f_e0a1),
            at(Mode::User, 0x40_1000),
            at(Mode::Kernel, 0x100_004f),
            at(Mode::Real, 0xfff0),
        ]);
        assert_eq!(
            summary,
            vec![
                ("free_reserved_area".to_owned(), 2),
                ("(kernel, outside its text)".to_owned(), 1),
                ("(user space)".to_owned(), 1),
                ("(vCPU not started)".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn a_file_without_kernel_text_markers_is_refused() {
        assert!(KernelSymbols::parse("0000000000001000 T main\n").is_err());
        let no_init = NM.replace("_sinittext", "x");
        assert!(KernelSymbols::parse(&no_init).is_err());
    }
}
