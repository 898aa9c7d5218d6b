//! Image references as Docker spells them, normalized to their full form:
//! `busybox` is `docker.io/library/busybox:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::ImageError;

/// The registry a name without one means.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `docker.io`, `localhost:5000`, `ghcr.io`.
    pub registry: String,
    /// `library/busybox`.
    pub repository: String,
    /// `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `@sha256:...`.
    pub digest: Option<Digest>,
}

fn refuse(reference: &str, why: &str) -> ImageError {
    ImageError::Reference {
        reference: reference.into(),
        why: why.into(),
    }
}

impl FromStr for Reference {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        if s.is_empty() || s.len() > 255 * 2 {
            return Err(refuse(s, "empty or too long"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/' (a registry port
        // comes before a '/').
        let slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[slash..].rfind(':') {
            Some(i) => (&name[..slash + i], Some(&name[slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return Err(refuse(
                    s,
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        let registry =
            if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
                let r = parts.remove(0);
                if !r
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                {
                    return Err(refuse(s, "a malformed registry host"));
                }
                r.to_owned()
            } else {
                DEFAULT_REGISTRY.to_owned()
            };
        for p in &parts {
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                && p.starts_with(|c: char| c.is_ascii_alphanumeric())
                && p.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(refuse(
                    s,
                    "repository path components are lowercase [a-z0-9] joined by . _ -",
                ));
            }
        }
        if registry == DEFAULT_REGISTRY && parts.len() == 1 {
            parts.insert(0, "library");
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository: parts.join("/"),
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn short_names_normalize_as_docker_does() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("user/app:1.0"), "docker.io/user/app:1.0");
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(norm("ghcr.io/o/r/x:v2"), "ghcr.io/o/r/x:v2");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("app@{d}")),
            format!("docker.io/library/app@{d}")
        );
        assert_eq!(
            norm(&format!("localhost:5000/app:t@{d}")),
            format!("localhost:5000/app:t@{d}")
        );
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "app:",
            "app:-x",
            "a//b",
            "app@sha256:12",
            "-app",
            "a b",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?}");
        }
    }
}
