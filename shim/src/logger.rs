//! `--log`, `--log-format` and `--debug`: runc-style log lines. containerd's
//! shim reads the last `error` entry of a JSON log to explain a failure.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::state::now_rfc3339;

/// Where log lines go.
#[derive(Debug)]
struct Logger {
    file: Option<Mutex<File>>,
    json: bool,
    debug: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Sets up logging once per process. Without a file, only errors appear
/// (on stderr, printed by `main`).
pub fn init(path: Option<&Path>, json: bool, debug: bool) -> anyhow::Result<()> {
    let file = match path {
        Some(p) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let _ = LOGGER.set(Logger { file, json, debug });
    Ok(())
}

/// The log file's descriptor, which a forked monitor keeps writing to.
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let file = LOGGER.get()?.file.as_ref()?;
    let fd = file.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd();
    Some(fd)
}

fn write(level: &str, msg: &str) {
    let Some(l) = LOGGER.get() else { return };
    if level == "debug" && !l.debug {
        return;
    }
    let Some(f) = &l.file else { return };
    let time = now_rfc3339();
    let line = if l.json {
        serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level={level} msg={msg:?}")
    };
    let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(f, "{line}");
}

/// An error (also printed on stderr by the caller).
pub fn error(msg: &str) {
    write("error", msg);
}

/// An error of the monitor after `create` returned: to the log, or, with
/// none, on stderr (the container's), as nobody else would ever see it.
pub fn monitor_error(msg: &str) {
    write("error", msg);
    if LOGGER.get().is_none_or(|l| l.file.is_none()) {
        eprintln!("runvm: {msg}");
    }
}

/// Something that works differently from what the caller asked.
pub fn warn(msg: &str) {
    write("warning", msg);
}

/// Only with `--debug`.
pub fn debug(msg: &str) {
    write("debug", msg);
}
