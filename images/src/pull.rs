//! Pulling images from OCI distribution (v2) registries with oci-client:
//! the manifest (the linux/amd64 one of an index or manifest list), the
//! config and the layers, each stored through the verified blob path so an
//! interrupted pull leaves nothing visible and a repeated one resumes with
//! the blobs it lacks.

use std::io::Read;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::DigestError;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;

use crate::digest::Digest;
use crate::error::ImageError;
use crate::reference::Reference;
use crate::store::{ImageRecord, Store};

/// The manifest media types runvm can use.
const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Indexes are JSON documents a few KiB long; a registry sending more is
/// refused before it is parsed.
const MAX_MANIFEST: usize = 4 << 20;

/// How a pull may reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain http; only for a registry on this machine (localhost,
    /// 127.0.0.0/8, ::1).
    pub insecure: bool,
    /// Basic credentials (exchanged for a token where the registry asks).
    pub credentials: Option<(String, String)>,
    /// Longest wait for a read from the registry.
    pub read_timeout: Option<Duration>,
}

/// What a pull reports as it goes.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The image's manifest is known: how many layers it has.
    Resolved { manifest: Digest, layers: usize },
    /// A blob (the config, then each layer) is being fetched.
    Blob {
        digest: Digest,
        size: u64,
        cached: bool,
    },
    /// More bytes of the current blob arrived (the total so far).
    Bytes { done: u64 },
}

/// Whether `registry` (a host with an optional port) is this machine.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Reads a blob stream on the runtime, for the store's synchronous writer.
struct StreamReader<'a> {
    rt: &'a tokio::runtime::Runtime,
    stream: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
    chunk: bytes::Bytes,
    done: u64,
    progress: &'a mut dyn FnMut(PullEvent),
    /// Set when the stream (not the store) failed a read.
    failed: &'a mut bool,
}

impl Read for StreamReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                Some(Ok(b)) => self.chunk = b,
                // oci-client checks digests when the stream ends, after the
                // last byte, and its message can name the wrong digest; the
                // store's own check of every byte against the descriptor's
                // digest and size follows and gives the clear error.
                Some(Err(e)) if e.get_ref().is_some_and(|i| i.is::<DigestError>()) => return Ok(0),
                Some(Err(e)) => {
                    *self.failed = true;
                    return Err(e);
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        self.done += n as u64;
        (self.progress)(PullEvent::Bytes { done: self.done });
        Ok(n)
    }
}

fn registry_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ImageError {
    ImageError::Registry(format!("{what}: {e}"))
}

/// The linux/amd64 entry of an index or manifest list.
fn pick_platform(index: &Value) -> Result<(Digest, String), ImageError> {
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| ImageError::Format("the image index has no manifests".into()))?;
    let m = manifests
        .iter()
        .find(|m| {
            m["platform"]["os"] == "linux"
                && m["platform"]["architecture"] == "amd64"
                && m["platform"]["variant"].as_str().is_none_or(|v| v == "v1")
        })
        .ok_or_else(|| {
            let have: Vec<String> = manifests
                .iter()
                .map(|m| {
                    format!(
                        "{}/{}",
                        m["platform"]["os"].as_str().unwrap_or("?"),
                        m["platform"]["architecture"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            ImageError::NotFound(format!(
                "a linux/amd64 image in the index (it has {})",
                have.join(", ")
            ))
        })?;
    let digest: Digest = m["digest"]
        .as_str()
        .ok_or_else(|| ImageError::Format("an index entry has no digest".into()))?
        .parse()?;
    let media = m["mediaType"].as_str().unwrap_or_default().to_owned();
    Ok((digest, media))
}

/// Whether a manifest document is an OCI index or a docker manifest list.
fn is_index(v: &Value) -> bool {
    let media_type = v["mediaType"].as_str().unwrap_or_default();
    media_type.contains("index")
        || media_type.contains("manifest.list")
        || v.get("manifests").is_some()
}

impl Store {
    /// Pulls `reference` (docker's short forms allowed) into the store and
    /// names the image by it.
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<ImageRecord, ImageError> {
        let r: Reference = reference.parse()?;
        if opts.insecure && !is_loopback(&r.registry) {
            return Err(ImageError::Registry(format!(
                "--insecure (plain http) is only for a registry on this machine, not {}",
                r.registry
            )));
        }
        let target = match &r.digest {
            Some(d) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.to_string(),
            ),
            None => oci_client::Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                r.tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        };
        let config = ClientConfig {
            protocol: if opts.insecure {
                ClientProtocol::HttpsExcept(vec![r.registry.clone()])
            } else {
                ClientProtocol::Https
            },
            read_timeout: opts.read_timeout,
            connect_timeout: Some(Duration::from_secs(30)),
            // runvm chooses the platform itself, from the raw index.
            platform_resolver: None,
            ..Default::default()
        };
        let client = oci_client::Client::new(config);
        let auth = match &opts.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| registry_err("start the client runtime", e))?;
        let _writing = self.writing()?;

        let fetch_manifest = |reference: &oci_client::Reference| {
            rt.block_on(client.pull_manifest_raw(reference, &auth, ACCEPTED))
                .map_err(|e| registry_err(format!("manifest of {reference}"), e))
        };
        // The reference's manifest, or through (at most two levels of)
        // indexes the linux/amd64 one, each checked against the digest that
        // named it.
        let mut at = target.clone();
        let mut want = r.digest.clone();
        let mut depth = 0;
        let (bytes, manifest_digest, v) = loop {
            let (bytes, digest) = fetch_manifest(&at)?;
            let digest: Digest = digest.parse()?;
            if let Some(w) = want.take() {
                if digest != w {
                    return Err(ImageError::DigestMismatch {
                        expected: w,
                        actual: digest,
                    });
                }
            }
            if bytes.len() > MAX_MANIFEST {
                return Err(ImageError::Format(format!(
                    "the manifest of {reference} is larger than {MAX_MANIFEST} bytes"
                )));
            }
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ImageError::Format(format!("manifest of {reference}: {e}")))?;
            if !is_index(&v) {
                break (bytes, digest, v);
            }
            depth += 1;
            if depth > 2 {
                return Err(ImageError::Format(format!(
                    "{reference}: an index inside an index inside an index"
                )));
            }
            let (d, _) = pick_platform(&v)?;
            at = oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.to_string(),
            );
            want = Some(d);
        };
        let descriptors: Vec<(Digest, u64)> = std::iter::once(&v["config"])
            .chain(v["layers"].as_array().into_iter().flatten())
            .map(|d| {
                let digest: Digest = d["digest"]
                    .as_str()
                    .ok_or_else(|| ImageError::Format("a descriptor has no digest".into()))?
                    .parse()?;
                let size = d["size"].as_u64().ok_or_else(|| {
                    ImageError::Format(format!("descriptor {digest} has no size"))
                })?;
                Ok((digest, size))
            })
            .collect::<Result<_, ImageError>>()?;
        progress(PullEvent::Resolved {
            manifest: manifest_digest.clone(),
            layers: descriptors.len() - 1,
        });
        for (d, size) in &descriptors {
            let cached = self.blobs().has(d);
            progress(PullEvent::Blob {
                digest: d.clone(),
                size: *size,
                cached,
            });
            if cached {
                continue;
            }
            let digest_str = d.to_string();
            let stream = rt
                .block_on(client.pull_blob_stream(&target, digest_str.as_str()))
                .map_err(|e| registry_err(format!("blob {d}"), e))?;
            let mut stream_failed = false;
            let reader = StreamReader {
                rt: &rt,
                stream: stream.stream,
                chunk: bytes::Bytes::new(),
                done: 0,
                progress: &mut *progress,
                failed: &mut stream_failed,
            };
            let stored = self.blobs().put(d, Some(*size), reader);
            stored.map_err(|e| match (stream_failed, e) {
                // The connection's error, not the disk's.
                (true, ImageError::Io { source, .. }) => registry_err(format!("blob {d}"), source),
                (_, e) => e,
            })?;
        }
        // The manifest goes in last: a blob it names is never missing.
        self.blobs()
            .put(&manifest_digest, Some(bytes.len() as u64), &bytes[..])?;
        self.add(&manifest_digest, &[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machine_counts_as_loopback() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.evil.com",
            "[fe80::1]:5000",
            "",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn the_index_entry_for_linux_amd64_is_picked() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({"manifests": [
            {"digest": d('a'), "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": d('b'), "platform": {"os": "windows", "architecture": "amd64"}},
            {"digest": d('c'), "mediaType": "m", "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        let (digest, media) = pick_platform(&index).unwrap();
        assert_eq!((digest.to_string(), media.as_str()), (d('c'), "m"));
        let none = serde_json::json!({"manifests": [
            {"digest": d('a'), "platform": {"os": "linux", "architecture": "arm64"}}]});
        let e = pick_platform(&none).unwrap_err().to_string();
        assert!(e.contains("linux/arm64"), "{e}");
        assert!(pick_platform(&serde_json::json!({})).is_err());
    }
}
