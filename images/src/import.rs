//! Imports images from an OCI image layout (a directory, or a tarball of
//! one: `skopeo copy oci-archive:`, `docker save` of Docker 25+) and from
//! `docker save` archives (manifest.json with Config, RepoTags and Layers).
//! Every blob is copied through the verifying blob store; a tarball is
//! first unpacked into staging with the same checks as a layer.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageIndex, Os};
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{io_err, json_err, ImageError};
use crate::layer::{self, ApplyOptions};
use crate::reference::Reference;
use crate::scoped::{entry_name, resolve};
use crate::store::{ImageRecord, Store};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Store {
    /// Imports every image in the archive or layout at `path`. `name`, if
    /// given, names the image (the archive must hold exactly one).
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<ImageRecord>, ImageError> {
        let name = name.map(str::parse::<Reference>).transpose()?;
        let _writing = self.writing()?;
        let meta = fs::metadata(path).map_err(io_err(format!("{}", path.display())))?;
        if meta.is_dir() {
            return self.import_dir(path, name.as_ref());
        }
        // Removed, whatever happens, when `staging` goes.
        let staging = self.staging_dir("import-")?;
        let f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
        let unprivileged = ApplyOptions { privileged: false };
        layer::apply(f, staging.path(), unprivileged).map_err(|e| match e {
            ImageError::Format(m) => ImageError::Format(format!("{}: {m}", path.display())),
            e => e,
        })?;
        self.import_dir(staging.path(), name.as_ref())
    }

    fn import_dir(
        &self,
        dir: &Path,
        name: Option<&Reference>,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        if dir.join("manifest.json").exists() {
            self.import_docker(dir, name)
        } else if dir.join("index.json").exists() && dir.join("oci-layout").exists() {
            self.import_layout(dir, name)
        } else {
            Err(ImageError::Format(format!(
                "{} is neither an OCI image layout (oci-layout, index.json) nor a \
                 `docker save` archive (manifest.json)",
                dir.display()
            )))
        }
    }

    fn import_docker(
        &self,
        dir: &Path,
        name: Option<&Reference>,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let bytes = read_inside(dir, "manifest.json")?;
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&bytes).map_err(json_err("the archive's manifest.json"))?;
        check_one_named(entries.len(), name)?;
        let mut out = Vec::new();
        for e in entries {
            let (config, config_size) = self.blobs().put_file(&file_inside(dir, &e.config)?)?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let file = file_inside(dir, l)?;
                let media = layer_media_type(&file)?;
                let (d, size) = self.blobs().put_file(&file)?;
                layers.push(
                    serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": size}),
                );
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config.to_string(),
                    "size": config_size,
                },
                "layers": layers,
            });
            let m = self.blobs().put_bytes(manifest.to_string().as_bytes())?;
            let names = match name {
                Some(n) => vec![n.clone()],
                None => e
                    .repo_tags
                    .unwrap_or_default()
                    .iter()
                    .map(|t| t.parse())
                    .collect::<Result<_, _>>()?,
            };
            out.push(self.add(&m, &names)?);
        }
        Ok(out)
    }

    fn import_layout(
        &self,
        dir: &Path,
        name: Option<&Reference>,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let bytes = read_inside(dir, "index.json")?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(json_err("the layout's index.json"))?;
        let mut picked = Vec::new();
        for desc in index.manifests() {
            let names = descriptor_names(desc);
            if let Some(m) = self.pick_manifest(dir, desc, 0)? {
                picked.push((m, names));
            }
        }
        check_one_named(picked.len(), name)?;
        let mut out = Vec::new();
        for (m, names) in picked {
            let names = match name {
                Some(n) => vec![n.clone()],
                None => names,
            };
            out.push(self.add(&m, &names)?);
        }
        Ok(out)
    }

    /// Copies the image `desc` names (choosing linux/amd64 in an index)
    /// with its config and layers; `None` when an index has no
    /// linux/amd64 image.
    fn pick_manifest(
        &self,
        dir: &Path,
        desc: &Descriptor,
        depth: u32,
    ) -> Result<Option<Digest>, ImageError> {
        let d: Digest = desc.digest().to_string().parse()?;
        let media = desc.media_type().to_string();
        if depth > 4 {
            return Err(ImageError::Format("image indexes nested too deep".into()));
        }
        self.copy_blob(dir, &d, desc.size())?;
        if media == OCI_INDEX || media == DOCKER_LIST {
            let bytes = self.blobs().read(&d)?;
            let nested: ImageIndex =
                serde_json::from_slice(&bytes).map_err(json_err(format!("index {d}")))?;
            for m in nested.manifests() {
                if is_linux_amd64(m) {
                    return self.pick_manifest(dir, m, depth + 1);
                }
            }
            return Ok(None);
        }
        if !is_linux_amd64(desc) {
            return Ok(None);
        }
        let bytes = self.blobs().read(&d)?;
        let m: oci_spec::image::ImageManifest =
            serde_json::from_slice(&bytes).map_err(json_err(format!("manifest {d}")))?;
        self.copy_blob(
            dir,
            &m.config().digest().to_string().parse()?,
            m.config().size(),
        )?;
        for l in m.layers() {
            self.copy_blob(dir, &l.digest().to_string().parse()?, l.size())?;
        }
        Ok(Some(d))
    }

    fn copy_blob(&self, dir: &Path, d: &Digest, size: u64) -> Result<(), ImageError> {
        if self.blobs().has(d) {
            return Ok(());
        }
        let rel = format!("blobs/{}/{}", d.algorithm(), d.encoded());
        let f = File::open(file_inside(dir, &rel)?).map_err(io_err(format!("open {rel}")))?;
        self.blobs().put(d, Some(size), f)?;
        Ok(())
    }
}

fn check_one_named(count: usize, name: Option<&Reference>) -> Result<(), ImageError> {
    if count == 0 {
        return Err(ImageError::Format(
            "the archive holds no linux/amd64 image".into(),
        ));
    }
    if name.is_some() && count > 1 {
        return Err(ImageError::Format(format!(
            "the archive holds {count} images: a name can be given to only one"
        )));
    }
    Ok(())
}

fn is_linux_amd64(desc: &Descriptor) -> bool {
    desc.platform()
        .as_ref()
        .is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

/// The names an index entry carries, where they are whole references.
fn descriptor_names(desc: &Descriptor) -> Vec<Reference> {
    let Some(ann) = desc.annotations() else {
        return Vec::new();
    };
    [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ]
    .iter()
    .filter_map(|k| ann.get(*k))
    // A bare tag ("latest") names nothing by itself.
    .filter(|v| v.contains(['/', ':', '@']) || v.chars().any(|c| c == '.'))
    .filter_map(|v| v.parse().ok())
    .take(1)
    .collect()
}

/// A file the archive names, resolved inside its directory.
fn file_inside(dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let rel = entry_name(name.as_bytes())?
        .ok_or_else(|| ImageError::Format(format!("the archive names {name:?} as a file")))?;
    let p = dir.join(resolve(dir, &rel, false, true)?);
    if !p.is_file() {
        return Err(ImageError::Format(format!(
            "the archive has no file {name:?}"
        )));
    }
    Ok(p)
}

fn read_inside(dir: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    let p = file_inside(dir, name)?;
    let len = fs::metadata(&p).map_err(io_err(name.to_string()))?.len();
    if len > 16 << 20 {
        return Err(ImageError::Format(format!(
            "{name} is {len} bytes: too big"
        )));
    }
    fs::read(&p).map_err(io_err(format!("read {name}")))
}

fn layer_media_type(file: &Path) -> Result<&'static str, ImageError> {
    let mut head = [0u8; 4];
    let n = std::io::Read::read(
        &mut File::open(file).map_err(io_err(format!("open {}", file.display())))?,
        &mut head,
    )
    .map_err(io_err(format!("read {}", file.display())))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    })
}
