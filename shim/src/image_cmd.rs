//! `runvm image ...`: the image store from the command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use runvm_images::{ImageRecord, PullEvent, PullOptions, RunSettings, Store, UnpackEvent};

use crate::stdout;

/// Where images live unless `--store` or `$RUNVM_STORE` says otherwise.
pub const DEFAULT_STORE: &str = "/var/lib/runvm";

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import images from an OCI image layout (directory or tarball) or a
    /// `docker save` archive.
    Import {
        /// The layout directory or archive.
        path: PathBuf,
        /// Name the image (the archive must hold one).
        name: Option<String>,
    },
    /// Pull an image from an OCI distribution registry (linux/amd64).
    Pull {
        /// `NAME[:TAG]` or `NAME@DIGEST` (docker's short forms allowed).
        reference: String,
        #[command(flatten)]
        opts: PullArgs,
    },
    /// Make a one-layer image from a directory (as `docker import` does).
    Create {
        /// The image's name.
        name: String,
        /// The directory that becomes its rootfs.
        dir: PathBuf,
        /// The image's Cmd (repeat for each argument).
        #[arg(long = "cmd", allow_hyphen_values = true)]
        cmd: Vec<String>,
        /// The image's Entrypoint (repeat for each argument).
        #[arg(long = "entrypoint", allow_hyphen_values = true)]
        entrypoint: Vec<String>,
        /// An Env entry, K=V.
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// The WorkingDir.
        #[arg(short, long, default_value = "")]
        workdir: String,
        /// The User.
        #[arg(short, long, default_value = "")]
        user: String,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        /// Only IDs.
        #[arg(short, long)]
        quiet: bool,
        /// table or json.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Print an image's record, manifest and config as JSON.
    Inspect {
        /// Name, ID or ID prefix.
        image: String,
    },
    /// Remove images (a name is untagged; the image goes with its last name).
    #[command(alias = "remove")]
    Rm {
        /// Remove even if containers use it.
        #[arg(short, long)]
        force: bool,
        /// Names or IDs.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove blobs and unpacked layers no image refers to.
    Prune,
}

/// How to reach a registry.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PullArgs {
    /// Use plain http (only for a registry on this machine).
    #[arg(long)]
    pub insecure: bool,
    /// Log in as this user; the password is read from stdin.
    #[arg(long)]
    pub username: Option<String>,
}

impl PullArgs {
    fn options(&self) -> anyhow::Result<PullOptions> {
        let credentials = match &self.username {
            Some(u) => {
                let mut password = String::new();
                std::io::stdin()
                    .read_line(&mut password)
                    .context("cannot read the password from stdin")?;
                Some((
                    u.clone(),
                    password.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
            None => None,
        };
        Ok(PullOptions {
            insecure: self.insecure,
            credentials,
            read_timeout: Some(std::time::Duration::from_secs(60)),
        })
    }
}

/// Pulls `reference` with progress on stderr: a bar per blob on a
/// terminal, a line per blob otherwise.
pub fn pull(s: &Store, reference: &str, args: &PullArgs) -> anyhow::Result<ImageRecord> {
    let opts = args.options()?;
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |e: PullEvent| match e {
        PullEvent::Resolved { manifest, layers } => {
            eprintln!("{reference}: manifest {manifest}, {layers} layers");
        }
        PullEvent::Blob {
            digest,
            size,
            cached,
        } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let short = &digest.encoded()[..12];
            if cached {
                eprintln!("{short}: already here");
            } else if tty {
                let b = indicatif::ProgressBar::new(size);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_message(short.to_owned());
                bar = Some(b);
            } else {
                eprintln!("{short}: pulling {}", human_size(size));
            }
        }
        PullEvent::Bytes { done } => {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        }
    };
    let rec = s
        .pull(reference, &opts, &mut progress)
        .with_context(|| format!("cannot pull {reference}"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(rec)
}

pub fn open(store: &Path) -> anyhow::Result<Store> {
    Store::open(store).with_context(|| format!("cannot open the image store {}", store.display()))
}

pub fn dispatch(store: &Path, cmd: ImageCmd) -> anyhow::Result<()> {
    let s = open(store)?;
    match cmd {
        ImageCmd::Import { path, name } => {
            for rec in s.import(&path, name.as_deref())? {
                stdout::line(&format!("Loaded image: {}", describe(&rec)))?;
            }
        }
        ImageCmd::Pull { reference, opts } => {
            let rec = pull(&s, &reference, &opts)?;
            // As docker's pull: ready to run afterwards.
            rootfs_with_progress(&s, &rec)?;
            stdout::line(&format!("Pulled {} ({})", describe(&rec), rec.config))?;
        }
        ImageCmd::Create {
            name,
            dir,
            cmd,
            entrypoint,
            env,
            workdir,
            user,
        } => {
            let settings = RunSettings {
                env,
                entrypoint,
                cmd,
                working_dir: workdir,
                user,
            };
            let rec = s.create_from_dir(&dir, &name, &settings)?;
            stdout::line(&rec.config)?;
        }
        ImageCmd::Ls { quiet, format } => stdout::print(&list(&s, quiet, &format)?)?,
        ImageCmd::Inspect { image } => {
            let rec = s.find(&image)?;
            let out = serde_json::json!({
                "Id": rec.config,
                "Manifest": rec.manifest,
                "RepoTags": rec.names,
                "Size": rec.size,
                "Created": rec.created,
                "Containers": s.holders(&rec),
                "Config": s.config(&rec)?,
                "Layers": s.manifest(&rec)?.layers(),
            });
            stdout::line(&serde_json::to_string_pretty(&out)?)?;
        }
        ImageCmd::Rm { force, images } => {
            let mut failed = None;
            for i in images {
                match s.remove(&i, force) {
                    Ok(lines) => {
                        for l in lines {
                            stdout::line(&l)?;
                        }
                    }
                    Err(e) => {
                        eprintln!("runvm: error: {e}");
                        failed = Some(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        ImageCmd::Prune => {
            let g = s.gc()?;
            stdout::line(&format!(
                "Removed {} blobs ({} bytes) and {} unpacked images",
                g.blobs, g.bytes, g.rootfs
            ))?;
        }
    }
    Ok(())
}

fn describe(rec: &ImageRecord) -> String {
    match rec.names.first() {
        Some(n) => n.clone(),
        None => rec.config.clone(),
    }
}

fn list(s: &Store, quiet: bool, format: &str) -> anyhow::Result<String> {
    let images = s.images()?;
    if format == "json" {
        return Ok(serde_json::to_string_pretty(&images)? + "\n");
    }
    let mut out = String::new();
    if quiet {
        for r in &images {
            out += &format!("{}\n", r.short_id());
        }
        return Ok(out);
    }
    out += &format!(
        "{:<48} {:<14} {:>10}  {}\n",
        "REPOSITORY:TAG", "IMAGE ID", "SIZE", "CREATED"
    );
    for r in &images {
        let names = if r.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            r.names.clone()
        };
        for n in names {
            out += &format!(
                "{:<48} {:<14} {:>10}  {}\n",
                n,
                r.short_id(),
                human_size(r.size),
                r.created.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(out)
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The image's rootfs, unpacked with progress: a bar on a terminal, plain
/// lines otherwise (both on stderr, which is not the container's output).
pub fn rootfs_with_progress(s: &Store, rec: &ImageRecord) -> anyhow::Result<PathBuf> {
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |e: UnpackEvent| match e {
        UnpackEvent::Layer {
            index,
            total,
            digest,
            size,
        } => {
            let short = &digest.encoded()[..12];
            if tty {
                let b = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(total as u64);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "unpacking {bar:30} {pos}/{len} layers {msg}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b
                });
                b.set_message(format!("{short} ({})", human_size(size)));
            } else {
                eprintln!(
                    "unpacking layer {}/{total} {short} ({})",
                    index + 1,
                    human_size(size)
                );
            }
        }
        UnpackEvent::Done { .. } => {
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
    };
    let root = s.rootfs(rec, &mut progress)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(root)
}
