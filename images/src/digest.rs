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

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new("sha256");
        h.update(bytes);
        h.finish()
    }

    /// A hasher of this digest's algorithm, to check content against it.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }
}

/// Computes a digest of content fed to it piece by piece.
pub enum Hasher {
    /// sha256
    Sha256(sha2::Sha256),
    /// sha512
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hasher::Sha256(_) => "Hasher(sha256)",
            Hasher::Sha512(_) => "Hasher(sha512)",
        })
    }
}

impl Hasher {
    fn new(algorithm: &str) -> Hasher {
        use sha2::Digest as _;
        match algorithm {
            "sha512" => Hasher::Sha512(sha2::Sha512::new()),
            _ => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// A sha256 hasher.
    pub fn sha256() -> Hasher {
        Hasher::new("sha256")
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        use sha2::Digest as _;
        let (algorithm, bytes) = match self {
            Hasher::Sha256(h) => ("sha256", h.finalize().to_vec()),
            Hasher::Sha512(h) => ("sha512", h.finalize().to_vec()),
        };
        let encoded = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Digest { algorithm, encoded }
    }
}

/// A reader that hashes what passes through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: std::io::Read> HashingReader<R> {
    /// Wraps `inner`, hashing with `hasher`.
    pub fn new(inner: R, hasher: Hasher) -> Self {
        HashingReader {
            inner,
            hasher,
            count: 0,
        }
    }

    /// The digest of the bytes read so far and their count.
    pub fn finish(self) -> (Digest, u64) {
        (self.hasher.finish(), self.count)
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: std::io::Write> HashingWriter<W> {
    /// Wraps `inner`, hashing with `hasher`.
    pub fn new(inner: W, hasher: Hasher) -> Self {
        HashingWriter { inner, hasher }
    }

    /// The inner writer and the digest of the bytes written.
    pub fn finish(self) -> (W, Digest) {
        (self.inner, self.hasher.finish())
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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

    #[test]
    fn content_hashes_to_its_digest() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        let mut r = HashingReader::new(&b"abc"[..], Hasher::sha256());
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let (d, n) = r.finish();
        assert_eq!(n, 3);
        assert_eq!(
            d.encoded(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert!(matches!(long.hasher(), Hasher::Sha512(_)));
    }
}
