//! Printing results: a reader that went away (`runvm image inspect X |
//! head`) ends the output quietly instead of failing the command.

use std::io::Write;

/// Writes `text` to stdout; a closed pipe is not an error.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// [`print()`] with a newline.
pub fn line(text: &str) -> anyhow::Result<()> {
    print(&format!("{text}\n"))
}
