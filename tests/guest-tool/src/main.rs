//! `runvm-guest-tool`: what the integration tests run inside a guest to
//! exercise devices from the guest's side. Built static like the agent.
//!
//! - `echo-server PORT CONNS`: accept CONNS vsock connections on PORT, echo
//!   each until EOF, then exit.
//! - `send-host PORT BYTES CONNS`: open CONNS concurrent connections to the
//!   host's PORT, send BYTES on each while reading the echo back, check it.
//! - `send-tcp ADDR:PORT BYTES CONNS`: the same over TCP (the NIC).
//! - `fs-bench DIR MIB FILES`: sequential write then read of a MIB-sized
//!   file, then create/stat/read/delete FILES small files, in DIR; prints
//!   the figures (the same binary runs natively for the baseline).

mod vsock;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context};

/// The byte at offset `i` of every test stream: not periodic at any power
/// of two, so a dropped or repeated chunk shows.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn echo(mut conn: vsock::Stream) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf).context("echo read")?;
        if n == 0 {
            return Ok(total);
        }
        conn.write_all(&buf[..n]).context("echo write")?;
        total += n as u64;
    }
}

fn echo_server(port: u32, conns: usize) -> anyhow::Result<()> {
    let listener = vsock::Listener::bind(port)?;
    println!("LISTENING {port}");
    let mut workers = Vec::new();
    for _ in 0..conns {
        let conn = listener.accept()?;
        workers.push(thread::spawn(move || echo(conn)));
    }
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    }
    println!("ECHOED conns={conns} bytes={total}");
    Ok(())
}

/// A connected byte stream of either kind the tool speaks.
trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle, for writing while another thread reads.
    fn split(&self) -> anyhow::Result<Self>;
    /// Half-closes: the peer reads EOF.
    fn close_write(&self) -> anyhow::Result<()>;
}

impl Duplex for vsock::Stream {
    fn split(&self) -> anyhow::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) -> anyhow::Result<()> {
        self.shutdown_write()
    }
}

impl Duplex for std::net::TcpStream {
    fn split(&self) -> anyhow::Result<Self> {
        Ok(self.try_clone()?)
    }
    fn close_write(&self) -> anyhow::Result<()> {
        Ok(self.shutdown(std::net::Shutdown::Write)?)
    }
}

fn send_one<S: Duplex>(conn: S, bytes: usize) -> anyhow::Result<()> {
    let mut writer = conn.split()?;
    let sender = thread::spawn(move || -> anyhow::Result<()> {
        // A whole number of pattern periods, so every full chunk starts
        // where the pattern does.
        let chunk: Vec<u8> = (0..251 * 4096).map(pattern).collect();
        let mut sent = 0;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len());
            writer.write_all(&chunk[..n]).context("send")?;
            sent += n;
        }
        writer.close_write()
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    loop {
        let n = reader.read(&mut buf).context("receive")?;
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            if *b != pattern(got + k) {
                bail!("byte {} is {b}, expected {}", got + k, pattern(got + k));
            }
        }
        got += n;
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if got != bytes {
        bail!("echo returned {got} of {bytes} bytes");
    }
    Ok(())
}

/// Opens `conns` connections with `connect` at once, sends `bytes` on each
/// and checks the echo; prints the combined throughput of both directions.
fn send_all<S: Duplex>(
    connect: impl Fn() -> anyhow::Result<S> + Send + Sync + 'static,
    bytes: usize,
    conns: usize,
) -> anyhow::Result<()> {
    let connect = std::sync::Arc::new(connect);
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let connect = connect.clone();
            thread::spawn(move || send_one(connect()?, bytes))
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        w.join()
            .map_err(|_| anyhow::anyhow!("connection {i} panicked"))?
            .with_context(|| format!("connection {i}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mib = (bytes * conns) as f64 / (1 << 20) as f64;
    println!(
        "SENT-OK conns={conns} bytes={bytes} secs={secs:.3} mib_per_s={:.1}",
        mib * 2.0 / secs
    );
    Ok(())
}

fn drop_caches() {
    // Only root can; without it the read may come from the page cache,
    // which the caller sees in the figures.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn fs_bench(dir: &std::path::Path, mib: usize, files: usize) -> anyhow::Result<()> {
    use std::fs::{self, File};
    let chunk: Vec<u8> = (0..1 << 20).map(pattern).collect();
    let big = dir.join("fs-bench.big");
    let start = Instant::now();
    let mut f = File::create(&big).context("create the big file")?;
    for _ in 0..mib {
        f.write_all(&chunk).context("write")?;
    }
    f.sync_all().context("fsync")?;
    drop(f);
    let write_s = start.elapsed().as_secs_f64();
    drop_caches();
    let start = Instant::now();
    let mut f = File::open(&big).context("open the big file")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).context("read")?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let read_s = start.elapsed().as_secs_f64();
    if total != mib << 20 {
        bail!("read {total} bytes of {}", mib << 20);
    }
    fs::remove_file(&big).context("remove the big file")?;

    let tree = dir.join("fs-bench.small");
    fs::create_dir_all(&tree).context("mkdir")?;
    let start = Instant::now();
    let name = |i: usize| tree.join(format!("f{i}"));
    // Each phase's share of the time says which requests cost.
    let mut phases = [0f64; 4];
    let mut lap = Instant::now();
    let mut phase_done = |i: usize| {
        phases[i] = lap.elapsed().as_secs_f64();
        lap = Instant::now();
    };
    for i in 0..files {
        fs::write(name(i), &chunk[..100]).context("create a small file")?;
    }
    phase_done(0);
    for i in 0..files {
        fs::metadata(name(i)).context("stat")?;
    }
    phase_done(1);
    for i in 0..files {
        if fs::read(name(i)).context("read a small file")?.len() != 100 {
            bail!("small file {i} has the wrong size");
        }
    }
    phase_done(2);
    for i in 0..files {
        fs::remove_file(name(i)).context("delete")?;
    }
    phase_done(3);
    let meta_s = start.elapsed().as_secs_f64();
    fs::remove_dir(&tree).context("rmdir")?;
    println!(
        "FSBENCH dir={} mib={mib} write_s={write_s:.3} read_s={read_s:.3} write_mib_s={:.1} read_mib_s={:.1} files={files} meta_s={meta_s:.3} create_s={:.3} stat_s={:.3} readsmall_s={:.3} delete_s={:.3}",
        dir.display(),
        mib as f64 / write_s,
        mib as f64 / read_s,
        phases[0],
        phases[1],
        phases[2],
        phases[3]
    );
    Ok(())
}

/// Answers every datagram to `port` with the same bytes, for ever (a
/// published UDP port's far end in the runtime tests).
fn udp_echo(port: u16) -> anyhow::Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port)).context("bind")?;
    println!("UDP LISTENING {port}");
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).context("receive")?;
        sock.send_to(&buf[..n], from).context("send")?;
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> anyhow::Result<T> {
    args.get(i)
        .with_context(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("bad {what}: {}", args[i]))
}

fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("echo-server") => {
            echo_server(arg(args, 1, "port")?, arg(args, 2, "connection count")?)
        }
        Some("send-host") => {
            let port: u32 = arg(args, 1, "port")?;
            send_all(
                move || vsock::Stream::connect_host(port),
                arg(args, 2, "byte count")?,
                arg(args, 3, "connection count")?,
            )
        }
        Some("send-tcp") => {
            let addr: std::net::SocketAddr = arg(args, 1, "address")?;
            send_all(
                move || {
                    std::net::TcpStream::connect(addr)
                        .with_context(|| format!("connect to {addr}"))
                },
                arg(args, 2, "byte count")?,
                arg(args, 3, "connection count")?,
            )
        }
        Some("udp-echo") => udp_echo(arg(args, 1, "port")?),
        Some("fs-bench") => fs_bench(
            std::path::Path::new(&arg::<String>(args, 1, "directory")?),
            arg(args, 2, "size in MiB")?,
            arg(args, 3, "file count")?,
        ),
        _ => bail!(
            "usage: runvm-guest-tool echo-server PORT CONNS | send-host PORT BYTES CONNS | send-tcp ADDR:PORT BYTES CONNS | udp-echo PORT | fs-bench DIR MIB FILES"
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runvm-guest-tool: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
