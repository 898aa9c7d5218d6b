//! Unpack throughput: runvm's layer application against GNU `tar -xzf` of
//! the same gzip layers (a ~200 MiB four-layer image of small and large
//! files), and what a second use of an unpacked image costs. Prints figures;
//! run with `tests/bench.sh unpack`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use runvm_images::layer::{apply, ApplyOptions};
use runvm_images::{RunSettings, Store, UnpackEvent};

const ROUNDS: usize = 3;

/// xorshift: fast, reproducible file contents that gzip can half-compress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Bytes where every other 8-byte word is random and the rest is text.
    fn fill(&mut self, buf: &mut [u8]) {
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let word = if i % 2 == 0 {
                self.next().to_le_bytes()
            } else {
                *b"layer..."
            };
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// One gzip layer: `small` files of 1..16 KiB in nested directories,
/// `large` files of 8 MiB, symlinks and a hard link.
fn make_layer(path: &Path, seed: u64, small: usize, large: usize) -> u64 {
    let gz =
        flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut rng = Rng(seed);
    let mut total = 0u64;
    let add = |tar: &mut tar::Builder<_>, name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).unwrap();
    };
    for i in 0..small {
        let mut data = vec![0u8; 1024 + (rng.next() % (15 * 1024)) as usize];
        rng.fill(&mut data);
        total += data.len() as u64;
        add(
            &mut tar,
            format!("l{seed}/d{}/e{}/f{i}", i % 50, i % 7),
            &data,
        );
    }
    for i in 0..large {
        let mut data = vec![0u8; 8 << 20];
        rng.fill(&mut data);
        total += data.len() as u64;
        add(&mut tar, format!("l{seed}/big{i}"), &data);
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    tar.append_link(&mut h, format!("l{seed}/link"), "big0")
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    tar.append_link(&mut h, format!("l{seed}/hard"), format!("l{seed}/big0"))
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    total
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// An empty `dir`, with the previous round's writes flushed so they do
/// not slow the next one down.
fn fresh(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn time_gnu_tar(layers: &[PathBuf], dest: &Path) -> Duration {
    fresh(dest);
    let start = Instant::now();
    for l in layers {
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(l)
            .arg("-C")
            .arg(dest)
            .status()
            .expect("GNU tar");
        assert!(st.success(), "tar -xzf {}", l.display());
    }
    start.elapsed()
}

fn time_runvm(layers: &[PathBuf], dest: &Path) -> Duration {
    fresh(dest);
    let opts = ApplyOptions::for_this_process();
    let start = Instant::now();
    for l in layers {
        apply(File::open(l).unwrap(), dest, opts).unwrap();
    }
    start.elapsed()
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() {
    let work =
        tempfile::tempdir_in(std::env::var_os("RUNVM_BENCH_DIR").unwrap_or("/var/tmp".into()))
            .unwrap();
    let layers: Vec<PathBuf> = (0..4)
        .map(|i| work.path().join(format!("layer{i}.tar.gz")))
        .collect();
    let mut content = 0u64;
    for (i, l) in layers.iter().enumerate() {
        content += make_layer(l, i as u64 + 1, 3000, 4);
    }
    let gz: u64 = layers.iter().map(|l| l.metadata().unwrap().len()).sum();
    println!(
        "image: 4 gzip layers, {:.1} MiB of file content ({} files), {:.1} MiB compressed",
        content as f64 / (1 << 20) as f64,
        4 * (3000 + 4 + 2),
        gz as f64 / (1 << 20) as f64
    );
    let dest = work.path().join("out");
    let (mut tar_t, mut runvm_t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        tar_t.push(time_gnu_tar(&layers, &dest));
        runvm_t.push(time_runvm(&layers, &dest));
    }
    let (tar_m, runvm_m) = (median(tar_t), median(runvm_t));
    println!(
        "GNU tar -xzf, layer after layer: {:.0} ms ({:.0} MiB/s of content), median of {ROUNDS}",
        tar_m.as_secs_f64() * 1e3,
        mib_s(content, tar_m)
    );
    println!(
        "runvm layer::apply (with diff_id sha256, whiteout and escape checks): {:.0} ms ({:.0} MiB/s), median of {ROUNDS}",
        runvm_m.as_secs_f64() * 1e3,
        mib_s(content, runvm_m)
    );
    println!(
        "unpack throughput ratio runvm / GNU tar: {:.2} (target >= 0.8)",
        tar_m.as_secs_f64() / runvm_m.as_secs_f64()
    );

    // A second run of a cached image: the store hands back the unpacked
    // rootfs without reading a layer.
    let store = Store::open(&work.path().join("store")).unwrap();
    // SAFETY: as in `fresh`.
    unsafe { libc::sync() };
    let rec = store
        .create_from_dir(&dest, "bench", &RunSettings::default())
        .unwrap();
    let mut layers_read = 0;
    let start = Instant::now();
    store
        .rootfs(&rec, &mut |e| {
            layers_read += matches!(e, UnpackEvent::Layer { .. }) as u32
        })
        .unwrap();
    let first = start.elapsed();
    let mut again = 0;
    let start = Instant::now();
    store
        .rootfs(&rec, &mut |e| {
            again += matches!(e, UnpackEvent::Layer { .. }) as u32
        })
        .unwrap();
    let second = start.elapsed();
    assert_eq!((layers_read, again), (1, 0));
    println!(
        "store: first use of the image unpacks it in {:.0} ms; the second use takes {:.3} ms and reads no layer",
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3
    );
}
