//! Makes a one-layer image from a directory, as `docker import` does from
//! a rootfs tarball: how the project gets its busybox image with no
//! registry and no network.

use std::fs::File;
use std::path::Path;

use serde::Serialize;

use crate::digest::{Digest, Hasher, HashingWriter};
use crate::error::{io_err, ImageError};
use crate::reference::Reference;
use crate::store::{ImageRecord, Store};

/// What the image's config says about running it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunSettings {
    /// `Env`: `K=V` pairs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `Entrypoint`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `WorkingDir`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `User`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
}

impl Store {
    /// Stores `dir` as a gzip layer of a new linux/amd64 image named `name`.
    pub fn create_from_dir(
        &self,
        dir: &Path,
        name: &str,
        settings: &RunSettings,
    ) -> Result<ImageRecord, ImageError> {
        let name: Reference = name.parse()?;
        if !dir.is_dir() {
            return Err(ImageError::Format(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let _writing = self.writing()?;
        // Removed when `staged` goes; the blob store keeps its own copy.
        let staged = tempfile::Builder::new()
            .prefix("layer-")
            .tempfile_in(self.tmp())
            .map_err(io_err(format!("create a file in {}", self.tmp().display())))?;
        let diff_id = self.stage_layer(dir, staged.as_file())?;
        let (layer, layer_size) = self.blobs().put_file(staged.path())?;
        let created = now_rfc3339();
        let config = serde_json::json!({
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": settings,
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
            "history": [{"created": created, "created_by": format!("runvm image create {}", dir.display())}],
        });
        let config_bytes = config.to_string().into_bytes();
        let config_digest = self.blobs().put_bytes(&config_bytes)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config_bytes.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer.to_string(),
                "size": layer_size,
            }],
        });
        let m = self.blobs().put_bytes(manifest.to_string().as_bytes())?;
        self.add(&m, &[name])
    }

    /// Writes `dir` as a gzip tarball to `dest`; returns the tar's digest.
    fn stage_layer(&self, dir: &Path, dest: &File) -> Result<Digest, ImageError> {
        let gz = flate2::write::GzEncoder::new(dest, flate2::Compression::default());
        let tee = HashingWriter::new(gz, Hasher::sha256());
        let mut b = tar::Builder::new(tee);
        b.follow_symlinks(false);
        b.append_dir_all(".", dir)
            .map_err(io_err(format!("archive {}", dir.display())))?;
        let tee = b.into_inner().map_err(io_err("finish the layer"))?;
        let (gz, diff_id) = tee.finish();
        gz.finish()
            .and_then(|f| f.sync_all())
            .map_err(io_err("finish the layer"))?;
        Ok(diff_id)
    }
}

/// The current UTC time as RFC 3339, without a date crate.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
