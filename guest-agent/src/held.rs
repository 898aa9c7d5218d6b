//! Processes forked and set up at `create`, held just before their exec
//! until `start`, as runc holds its init on the exec fifo.
//!
//! So the container's init exists once the container is created: its
//! namespaces are there for an exec to join, a setup that fails (a user,
//! a capability, a mount, a program that is not there) fails `create`,
//! and `start` is one byte down a pipe.
//!
//! std's `Command::spawn` returns only once the child has exec'd, so it
//! cannot hold a child; this is its fork and exec, made for holding. The
//! child only makes system calls on data prepared before the fork (it is a
//! fork of a multi-threaded process), and tells the parent how it went on
//! a close-on-exec status pipe: `R` when it is set up and waiting, or `E`,
//! the step and an errno when a step failed (it then exits 127); at exec
//! the pipe closes, which is how the parent learns the program runs. The
//! parent words a failure as runc does where engines read it (a program
//! not found makes docker and podman report 127).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::child_setup::{ChildSetup, Step};
use crate::os_err::os_err;

/// The search path when the environment has no `PATH` (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program to run, its arguments and environment, as the child needs
/// them.
#[derive(Debug)]
pub struct Program {
    /// The program as the spec names it, for messages.
    name: String,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Where the program may be, in order: its path when it has a slash,
    /// else each directory of `PATH` joined with its name.
    candidates: Vec<CString>,
}

fn cstring(s: &str, what: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUL byte in {what} {s:?}"),
        )
    })
}

impl Program {
    /// `args[0]` is looked up as execvp would, in the `PATH` of `env`
    /// (`NAME=value` entries), but inside the container and as its user.
    pub fn new(args: &[String], env: &[String]) -> io::Result<Self> {
        let name = args
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program"))?;
        if name.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the program name is empty",
            ));
        }
        let argv = args
            .iter()
            .map(|a| cstring(a, "argument"))
            .collect::<io::Result<_>>()?;
        let envp = env
            .iter()
            .filter(|kv| kv.contains('='))
            .map(|kv| cstring(kv, "environment entry"))
            .collect::<io::Result<_>>()?;
        let candidates = if name.contains('/') {
            vec![cstring(name, "program")?]
        } else {
            let path = env
                .iter()
                .rev()
                .find_map(|kv| kv.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    cstring(&format!("{}/{name}", dir.trim_end_matches('/')), "program")
                })
                .collect::<io::Result<_>>()?
        };
        Ok(Program {
            name: name.clone(),
            argv,
            envp,
            candidates,
        })
    }
}

/// A NULL-terminated array of pointers into `strings`.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child's standard streams.
#[derive(Debug)]
pub enum ChildStdio {
    /// Three new pipes; the parent keeps their other ends.
    Pipes,
    /// A terminal's slave side for all three.
    Terminal(OwnedFd),
}

/// A pipe, both ends close-on-exec, neither of them 0, 1 or 2 (so that
/// the child's dup2 onto those cannot overwrite another source).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    os_err(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: just created, and belongs to nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((above_stdio(r)?, above_stdio(w)?))
}

fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: duplicates a descriptor we own; the result is checked.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    os_err(dup)?;
    // SAFETY: `dup` was just created and belongs to nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// A child set up and waiting for [`Held::release`].
#[derive(Debug)]
pub struct Held {
    /// Its PID in the agent's namespace.
    pub pid: i32,
    /// Where its stdin goes (pipes only).
    pub stdin: Option<OwnedFd>,
    /// Its stdout (pipes only).
    pub stdout: Option<OwnedFd>,
    /// Its stderr (pipes only).
    pub stderr: Option<OwnedFd>,
    /// A byte here lets it exec; closing it ends it unstarted.
    gate: OwnedFd,
    status: File,
    program: String,
    cwd: CString,
}

/// What a failed `step` means, worded as runc words it where engines
/// look for the words.
fn describe(step: Step, errno: i32, program: &str, cwd: &CStr) -> io::Error {
    let err = io::Error::from_raw_os_error(errno);
    let what = match step {
        Step::Lookup if errno == libc::ENOENT && !program.contains('/') => {
            format!("exec: {program:?}: executable file not found in $PATH")
        }
        Step::Lookup if errno == libc::ENOENT => {
            format!("exec: {program:?}: stat {program}: no such file or directory")
        }
        Step::Lookup if errno == libc::EACCES => format!("exec: {program:?}: permission denied"),
        Step::Lookup | Step::Exec => format!("exec {program:?}: {err}"),
        Step::Cwd => format!(
            "chdir to cwd ({:?}) set in config.json failed: {err}",
            cwd.to_string_lossy()
        ),
        Step::Stdio => format!("taking its stdin, stdout and stderr: {err}"),
        Step::Cgroup => format!("joining the container's cgroup: {err}"),
        Step::OomScoreAdj => format!("writing oom_score_adj: {err}"),
        Step::CgroupNs => format!("joining the container's cgroup namespace: {err}"),
        Step::Terminal => format!("taking the terminal as its controlling terminal: {err}"),
        Step::MountNs => format!("joining the container's mount namespace: {err}"),
        Step::Proc => format!("mounting its /proc: {err}"),
        Step::Devices => format!("making the spec's device nodes: {err}"),
        Step::Masks => format!("masking paths and making paths read-only: {err}"),
        Step::Rlimits => format!("setting rlimits: {err}"),
        Step::Seccomp => format!("loading the seccomp profile: {err}"),
        Step::Capabilities => format!("setting capabilities: {err}"),
        Step::User => format!("switching to the process's user and groups: {err}"),
        Step::NoNewPrivs => format!("setting no_new_privs: {err}"),
    };
    io::Error::new(err.kind(), what)
}

/// What the child reported, read from its status pipe.
enum Report {
    /// `R`: set up and waiting.
    Ready,
    /// The pipe's end: it exec'd (or died without a word).
    Closed,
}

/// Reads the child's next report; a failure it reported is the error.
fn read_status(status: &mut File, program: &str, cwd: &CStr) -> io::Result<Report> {
    let mut tag = [0u8; 1];
    loop {
        match status.read(&mut tag) {
            Ok(0) => return Ok(Report::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    match tag[0] {
        b'R' => Ok(Report::Ready),
        b'E' => {
            let mut rest = [0u8; 5];
            status.read_exact(&mut rest)?;
            let errno = i32::from_ne_bytes([rest[1], rest[2], rest[3], rest[4]]);
            match Step::from_u8(rest[0]) {
                Some(step) => Err(describe(step, errno, program, cwd)),
                None => Err(io::Error::other(format!(
                    "the new process failed at an unknown step {}",
                    rest[0]
                ))),
            }
        }
        other => Err(io::Error::other(format!(
            "the new process sent {other:#x} on its status pipe"
        ))),
    }
}

impl Held {
    /// Forks a child that takes `stdio`, applies `setup`, finds the
    /// program and waits. Returns once it waits; a step that failed is
    /// the error (the child then exits 127 and the reaper collects it).
    pub fn fork(program: &Program, stdio: ChildStdio, setup: &ChildSetup) -> io::Result<Held> {
        let (gate_r, gate_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        // The child's ends (0, 1, 2) and the parent's.
        let (child_fds, parent_fds): ([OwnedFd; 3], [Option<OwnedFd>; 3]) = match stdio {
            ChildStdio::Pipes => {
                let (in_r, in_w) = pipe()?;
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                ([in_r, out_w, err_w], [Some(in_w), Some(out_r), Some(err_r)])
            }
            ChildStdio::Terminal(slave) => {
                let slave = above_stdio(slave)?;
                (
                    [slave.try_clone()?, slave.try_clone()?, slave],
                    [None, None, None],
                )
            }
        };
        let argv = pointers(&program.argv);
        let envp = pointers(&program.envp);
        let candidates = pointers(&program.candidates);
        let child = ChildFds {
            stdio: child_fds.each_ref().map(AsRawFd::as_raw_fd),
            close: [
                gate_w.as_raw_fd(),
                status_r.as_raw_fd(),
                parent_fds[0].as_ref().map_or(-1, AsRawFd::as_raw_fd),
                parent_fds[1].as_ref().map_or(-1, AsRawFd::as_raw_fd),
                parent_fds[2].as_ref().map_or(-1, AsRawFd::as_raw_fd),
            ],
            gate: gate_r.as_raw_fd(),
            status: status_w.as_raw_fd(),
        };
        // SAFETY: the child runs only `run_child`, which makes system
        // calls on memory prepared above and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child, right after fork; see run_child.
            unsafe { run_child(&child, setup, &argv, &envp, &candidates) }
        }
        drop((child_fds, gate_r, status_w));
        let [stdin, stdout, stderr] = parent_fds;
        let mut status = File::from(status_r);
        match read_status(&mut status, &program.name, setup.cwd())? {
            Report::Ready => Ok(Held {
                pid,
                stdin,
                stdout,
                stderr,
                gate: gate_w,
                status,
                program: program.name.clone(),
                cwd: setup.cwd().to_owned(),
            }),
            Report::Closed => Err(io::Error::other(
                "the new process ended while it was being set up",
            )),
        }
    }

    /// Lets the child exec; returns once it did, or with the reason it
    /// could not (the child then exits 127).
    pub fn release(mut self) -> io::Result<()> {
        // SAFETY: writes one byte from a static buffer.
        let n = unsafe { libc::write(self.gate.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
        match read_status(&mut self.status, &self.program, &self.cwd)? {
            Report::Closed => Ok(()),
            Report::Ready => Err(io::Error::other("the new process reported twice")),
        }
    }
}

/// Descriptor numbers the child works with.
struct ChildFds {
    /// Its stdin, stdout and stderr to be.
    stdio: [RawFd; 3],
    /// The parent's ends (-1: none), closed first.
    close: [RawFd; 5],
    gate: RawFd,
    status: RawFd,
}

/// Reports the failed `step` and `errno` on the status pipe and exits 127.
fn fail(status: RawFd, step: Step, errno: i32) -> ! {
    let mut msg = [b'E', step as u8, 0, 0, 0, 0];
    msg[2..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writes 6 bytes from the stack.
    unsafe { libc::write(status, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: ends the process without running the parent's exit handlers.
    unsafe { libc::_exit(127) }
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EINVAL)
}

/// The first candidate that is a regular file this process may execute;
/// ENOENT when there is none, EACCES when one was there but not
/// executable (as execvp reports).
fn find_program(candidates: &[*const libc::c_char]) -> Result<*const libc::c_char, i32> {
    let mut errno = libc::ENOENT;
    for &path in candidates.iter().take_while(|p| !p.is_null()) {
        // SAFETY: stat writes one struct stat; `path` is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::stat(path, &mut st) } != 0 {
            continue;
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            // SAFETY: access reads the NUL-terminated path only.
            if unsafe { libc::access(path, libc::X_OK) } == 0 {
                return Ok(path);
            }
        }
        errno = libc::EACCES;
    }
    Err(errno)
}

/// Closes every descriptor above 2 but `a` and `b` (both above 2).
///
/// Everything the agent had open at the fork (the host's connection,
/// other processes' pipes and gates) would otherwise stay open in this
/// process until its exec, however long `start` takes: a connection the
/// agent closed would not end, another process's stdin would not reach
/// end-of-file. Close-on-exec does the same for a process that execs at
/// once. Failure (a seccomp profile that refuses close_range) leaves
/// them to close at exec.
fn close_all_but(a: RawFd, b: RawFd) {
    let (lo, hi) = (a.min(b) as u32, a.max(b) as u32);
    for (first, last) in [(3, lo - 1), (lo + 1, hi - 1), (hi + 1, u32::MAX)] {
        if first <= last {
            // SAFETY: close_range takes integers and only closes
            // descriptors; the ones this process still needs are outside
            // the range.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        }
    }
}

/// The child's side: stdio, setup, lookup, report, wait, exec.
///
/// # Safety
/// Only right after fork, in the child. It allocates nothing and makes
/// only system calls (and ChildSetup's, which are the same kind).
unsafe fn run_child(
    fds: &ChildFds,
    setup: &ChildSetup,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    candidates: &[*const libc::c_char],
) -> ! {
    for &fd in fds.close.iter().filter(|&&fd| fd >= 0) {
        // SAFETY: closes this process's copy of one of the parent's ends,
        // which it must not hold (while it held the gate's write end, the
        // gate would never read end-of-file).
        unsafe { libc::close(fd) };
    }
    // As std's spawn does: the agent's blocked signals and its ignored
    // SIGPIPE (Rust's runtime ignores it) are not the program's.
    // SAFETY: sigset_t is plain data; sigemptyset fills it in below.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: initializes the local set.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: reads the local set; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
    // SAFETY: sets a constant disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    for (target, &fd) in fds.stdio.iter().enumerate() {
        // SAFETY: descriptor operations on numbers this process holds; the
        // sources are all above 2, so no dup2 overwrites a later source.
        if unsafe { libc::dup2(fd, target as RawFd) } < 0 {
            fail(
                fds.status,
                Step::Stdio,
                errno_of(&io::Error::last_os_error()),
            );
        }
    }
    if let Err(e) = setup.apply() {
        fail(fds.status, e.step, errno_of(&e.error));
    }
    let path = match find_program(candidates) {
        Ok(p) => p,
        Err(errno) => fail(fds.status, Step::Lookup, errno),
    };
    close_all_but(fds.gate, fds.status);
    // SAFETY: writes one byte from a static buffer.
    unsafe { libc::write(fds.status, b"R".as_ptr().cast(), 1) };
    let mut byte = 0u8;
    let go = loop {
        // SAFETY: reads at most one byte into a local.
        let n = unsafe { libc::read(fds.gate, std::ptr::from_mut(&mut byte).cast(), 1) };
        if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break n == 1;
        }
    };
    if !go {
        // The gate closed: never started (the agent went away).
        // SAFETY: ends the process without the parent's exit handlers.
        unsafe { libc::_exit(0) }
    }
    if let Err(e) = setup.finish() {
        fail(fds.status, e.step, errno_of(&e.error));
    }
    // SAFETY: NULL-terminated arrays of NUL-terminated strings, prepared
    // before the fork (this process has its own copy of them).
    unsafe { libc::execve(path, argv.as_ptr(), envp.as_ptr()) };
    fail(
        fds.status,
        Step::Exec,
        errno_of(&io::Error::last_os_error()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn candidates(args: &[&str], env: &[&str]) -> Vec<String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        Program::new(&args, &env)
            .unwrap()
            .candidates
            .iter()
            .map(|c| {
                std::ffi::OsStr::from_bytes(c.to_bytes())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[test]
    fn programs_are_looked_up_in_the_processs_own_path() {
        assert_eq!(
            candidates(&["sh", "-c", "x"], &["A=1", "PATH=/opt/bin::/bin/"]),
            ["/opt/bin/sh", "./sh", "/bin/sh"]
        );
        assert_eq!(candidates(&["./run.sh"], &["PATH=/bin"]), ["./run.sh"]);
        assert_eq!(candidates(&["/bin/true"], &[]), ["/bin/true"]);
        assert_eq!(
            candidates(&["true"], &[]),
            DEFAULT_PATH
                .split(':')
                .map(|d| format!("{d}/true"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn unusable_programs_are_refused_before_any_fork() {
        for (args, env, why) in [
            (vec![], vec![], "no program"),
            (vec!["".to_owned()], vec![], "empty"),
            (vec!["a\0b".to_owned()], vec![], "NUL"),
            (vec!["true".to_owned(), "x\0".to_owned()], vec![], "NUL"),
            (vec!["true".to_owned()], vec!["A=\0".to_owned()], "NUL"),
        ] {
            let e = Program::new(&args, &env).unwrap_err().to_string();
            assert!(e.contains(why), "{args:?} {env:?}: {e}");
        }
    }

    #[test]
    fn failures_are_worded_as_runc_words_them() {
        let cwd = c"/work";
        let msg = |step, errno, program| describe(step, errno, program, cwd).to_string();
        assert_eq!(
            msg(Step::Lookup, libc::ENOENT, "nosuch"),
            "exec: \"nosuch\": executable file not found in $PATH"
        );
        assert_eq!(
            msg(Step::Lookup, libc::ENOENT, "/bin/nosuch"),
            "exec: \"/bin/nosuch\": stat /bin/nosuch: no such file or directory"
        );
        assert_eq!(
            msg(Step::Lookup, libc::EACCES, "./x"),
            "exec: \"./x\": permission denied"
        );
        assert!(msg(Step::Exec, libc::ENOEXEC, "/x").contains("Exec format error"));
        assert_eq!(
            msg(Step::Cwd, libc::ENOENT, "sh"),
            "chdir to cwd (\"/work\") set in config.json failed: \
             No such file or directory (os error 2)"
        );
        for step in Step::ALL {
            assert_eq!(Step::from_u8(step as u8), Some(step));
        }
        assert_eq!(Step::from_u8(0), None);
    }

    #[test]
    fn a_missing_or_unexecutable_program_gives_execvps_errno() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let c = |p: &std::path::Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let missing = [c(&dir.path().join("missing"))];
        assert_eq!(find_program(&pointers(&missing)), Err(libc::ENOENT));
        // A directory is skipped, and a file without an x bit (which even
        // root cannot execute) is EACCES.
        let not_programs = [c(dir.path()), c(&plain)];
        assert_eq!(find_program(&pointers(&not_programs)), Err(libc::EACCES));
        let sh = [
            c(&dir.path().join("missing")),
            c(std::path::Path::new("/bin/sh")),
        ];
        let ptrs = pointers(&sh);
        assert_eq!(find_program(&ptrs), Ok(ptrs[1]));
    }
}
