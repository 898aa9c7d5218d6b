use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Why a string is not an OCI content digest this store accepts.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    #[error("digest {0:?} has no algorithm prefix")]
    NoAlgorithm(String),
    /// An algorithm other than sha256/sha512.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The hex part has the wrong length or non-lowercase-hex characters.
    #[error("malformed {algorithm} digest {encoded:?}")]
    Malformed {
        /// The algorithm named.
        algorithm: &'static str,
        /// The encoded part as given.
        encoded: String,
    },
}

/// A validated `sha256:<64 hex>` or `sha512:<128 hex>` digest. Because the
/// encoded part is strict lowercase hex, a digest is always safe to use as a
/// file name inside the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: &'static str,
    encoded: String,
}

impl Digest {
    /// `sha256` or `sha512`.
    pub fn algorithm(&self) -> &str {
        self.algorithm
    }

    /// The lowercase hex part.
    pub fn encoded(&self) -> &str {
        &self.encoded
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, encoded) = s
            .split_once(':')
            .ok_or_else(|| DigestError::NoAlgorithm(s.into()))?;
        let (algorithm, len) = match alg {
            "sha256" => ("sha256", 64),
            "sha512" => ("sha512", 128),
            other => return Err(DigestError::UnsupportedAlgorithm(other.into())),
        };
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if encoded.len() != len || !encoded.chars().all(hex) {
            return Err(DigestError::Malformed {
                algorithm,
                encoded: encoded.into(),
            });
        }
        Ok(Digest {
            algorithm,
            encoded: encoded.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn valid_digests_round_trip() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let long = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(long.parse::<Digest>().unwrap().to_string(), long);
    }

    #[test]
    fn path_like_or_malformed_digests_are_rejected() {
        for bad in [
            "e3b0c442",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:../../etc/passwd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
