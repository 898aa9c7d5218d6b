//! `runvm image pull` against a real registry on 127.0.0.1 (Debian's
//! `docker-registry`, started here with its own storage and port) holding
//! images these tests build and push themselves, and against a hostile
//! registry served here that lies about blobs or dies mid-blob.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use runvm_tests::artifacts::runvm_binary;
use serde_json::json;
use sha2::{Digest as _, Sha256};

const REGISTRY: &str = "/usr/bin/docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A response: status, headers (lower-case names), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body).unwrap();
    Response {
        status,
        headers,
        body,
    }
}

/// A gzip layer holding `files`.
fn layer(files: &[(&str, &str)]) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = sha256(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// An image: its blobs and manifest.
struct Image {
    blobs: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

impl Image {
    /// One layer per entry of `layers`; the config's Cmd is `cmd`.
    fn new(layers: &[&[(&str, &str)]], cmd: &str, arch: &str) -> Self {
        let layers: Vec<(Vec<u8>, String)> = layers.iter().map(|f| layer(f)).collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": [cmd], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.1).collect::<Vec<_>>()},
        })
        .to_string()
        .into_bytes();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|(b, _)| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(b), "size": b.len()})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        let mut blobs = vec![config];
        blobs.extend(layers.into_iter().map(|l| l.0));
        Image { blobs, manifest }
    }

    /// The same image with docker's v2 schema 2 media types.
    fn docker(mut self) -> Self {
        let text = String::from_utf8(self.manifest)
            .unwrap()
            .replace(OCI_MANIFEST, DOCKER_MANIFEST)
            .replace(
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json",
            )
            .replace(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            );
        self.manifest = text.into_bytes();
        self
    }

    fn digest(&self) -> String {
        sha256(&self.manifest)
    }
}

/// An index (or manifest list) of `media_type` naming each image, of
/// `entry_type`, for linux and its architecture.
fn index(media_type: &str, entry_type: &str, images: &[(&Image, &str)]) -> String {
    let manifests: Vec<_> = images
        .iter()
        .map(|(img, arch)| {
            json!({"mediaType": entry_type, "digest": img.digest(), "size": img.manifest.len(),
                   "platform": {"os": "linux", "architecture": arch}})
        })
        .collect();
    json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}).to_string()
}

/// Debian's docker-registry on a free 127.0.0.1 port with its own storage,
/// optionally behind htpasswd basic auth.
struct Registry {
    child: Child,
    addr: String,
    auth: Option<String>,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(user: Option<(&str, &str)>) -> Self {
        assert!(
            Path::new(REGISTRY).exists(),
            "{REGISTRY} missing: setup.sh installs Debian's docker-registry"
        );
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        let mut auth = None;
        if let Some((u, p)) = user {
            let hash = bcrypt::hash(p, 4).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{u}:{hash}\n")).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
            auth = Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let r = Registry {
            child,
            addr,
            auth,
            _dir: dir,
        };
        let start = Instant::now();
        while TcpStream::connect(&r.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the registry never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        self.auth
            .iter()
            .map(|a| ("Authorization", a.clone()))
            .collect()
    }

    fn push_blob(&self, repo: &str, data: &[u8]) {
        let r = http(
            &self.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &self.headers(),
            b"",
        );
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let location = r.header("location").unwrap();
        let path = location
            .split_once("//")
            .map_or(location, |(_, rest)| &rest[rest.find('/').unwrap()..]);
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut headers = self.headers();
        headers.push(("Content-Type", "application/octet-stream".into()));
        let r = http(
            &self.addr,
            "PUT",
            &format!("{path}{sep}digest={}", sha256(data)),
            &headers,
            data,
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }

    fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        let mut headers = self.headers();
        headers.push(("Content-Type", media_type.into()));
        let r = http(
            &self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &headers,
            body,
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }

    fn push(&self, repo: &str, tag: &str, image: &Image) {
        for b in &image.blobs {
            self.push_blob(repo, b);
        }
        let text = String::from_utf8_lossy(&image.manifest);
        let media = if text.contains(DOCKER_MANIFEST) {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        self.push_manifest(repo, tag, media, &image.manifest);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store and the runvm command.
struct Client {
    dir: tempfile::TempDir,
}

impl Client {
    fn new() -> Self {
        Client {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn run(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new(runvm_binary())
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--store")
            .arg(self.store())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args, "");
        assert!(ok, "runvm {args:?}: {err}");
        out
    }

    fn fails(&self, args: &[&str], want: &str) -> String {
        let (ok, _, err) = self.run(args, "");
        assert!(!ok, "runvm {args:?} succeeded");
        assert!(err.contains(want), "runvm {args:?}: {err}");
        err
    }

    /// Pulls `reference` from a registry that wants user `tester` with
    /// password `s3cret`: without credentials and with a wrong password the
    /// pull fails. Returns the successful pull's stdout.
    fn pulls_only_as_tester_with_s3cret(&self, reference: &str) -> String {
        self.fails(&["image", "pull", "--insecure", reference], "cannot pull");
        let login = [
            "image",
            "pull",
            "--insecure",
            "--username",
            "tester",
            reference,
        ];
        let (ok, _, err) = self.run(&login, "wrong\n");
        assert!(!ok, "a wrong password was accepted: {err}");
        let (ok, out, err) = self.run(&login, "s3cret\n");
        assert!(ok, "{err}");
        out
    }

    fn inspect(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["image", "inspect", name])).unwrap()
    }

    /// The file `path` of the image's unpacked rootfs.
    fn rootfs_file(&self, name: &str, path: &str) -> String {
        let manifest = self.inspect(name)["Manifest"].as_str().unwrap().to_owned();
        let hex = manifest.trim_start_matches("sha256:");
        std::fs::read_to_string(self.store().join("rootfs").join(hex).join(path)).unwrap()
    }

    /// Blobs in the store, and whether anything is left in its tmp/.
    fn blobs(&self) -> Vec<String> {
        std::fs::read_dir(self.store().join("blobs/sha256"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn tmp_is_empty(&self) -> bool {
        std::fs::read_dir(self.store().join("tmp")).map_or(true, |mut d| d.next().is_none())
    }
}

#[test]
fn images_pull_by_tag_and_digest_and_an_index_gives_linux_amd64() {
    let reg = Registry::start(None);
    let two = Image::new(
        &[
            &[("hello", "first layer\n")],
            &[("second", "second layer\n")],
        ],
        "sh",
        "amd64",
    );
    reg.push("test/two", "v1", &two);
    let c = Client::new();
    let reference = format!("{}/test/two:v1", reg.addr);

    // Plain http needs --insecure, and is refused for another machine.
    c.fails(&["image", "pull", &reference], "registry");
    c.fails(
        &["image", "pull", "--insecure", "example.com/x:1"],
        "only for a registry on this machine",
    );
    assert!(c.blobs().is_empty());

    let out = c.ok(&["image", "pull", "--insecure", &reference]);
    assert!(out.starts_with(&format!("Pulled {reference}")), "{out}");
    let info = c.inspect(&reference);
    assert_eq!(info["Manifest"], two.digest());
    assert_eq!(info["Config"]["config"]["Cmd"], json!(["sh"]));
    assert_eq!(c.blobs().len(), 4);
    // Unpacked on use, both layers applied.
    assert_eq!(c.ok(&["image", "ls", "-q"]).lines().count(), 1);

    // Again: every blob is already here.
    let (ok, _, err) = c.run(&["image", "pull", "--insecure", &reference], "");
    assert!(ok, "{err}");
    assert_eq!(err.matches("already here").count(), 3, "{err}");

    // By digest.
    let by_digest = format!("{}/test/two@{}", reg.addr, two.digest());
    c.ok(&["image", "pull", "--insecure", &by_digest]);
    assert_eq!(c.inspect(&by_digest)["Manifest"], two.digest());
    let wrong = format!("{}/test/two@sha256:{}", reg.addr, "0".repeat(64));
    c.fails(&["image", "pull", "--insecure", &wrong], "cannot pull");

    // A multi-platform index: the linux/amd64 image is taken.
    let amd64 = Image::new(&[&[("arch", "amd64\n")]], "amd64-cmd", "amd64");
    let arm64 = Image::new(&[&[("arch", "arm64\n")]], "arm64-cmd", "arm64");
    for (img, tag) in [(&arm64, "arm64"), (&amd64, "amd64")] {
        reg.push("test/multi", tag, img);
    }
    let oci_index = index(
        OCI_INDEX,
        OCI_MANIFEST,
        &[(&arm64, "arm64"), (&amd64, "amd64")],
    );
    reg.push_manifest("test/multi", "latest", OCI_INDEX, oci_index.as_bytes());
    let multi = format!("{}/test/multi", reg.addr);
    c.ok(&["image", "pull", "--insecure", &multi]);
    let info = c.inspect(&multi);
    assert_eq!(info["Manifest"], amd64.digest());
    assert_eq!(info["Config"]["config"]["Cmd"], json!(["amd64-cmd"]));
    assert_eq!(c.rootfs_file(&multi, "arch"), "amd64\n");

    // docker's v2 schema 2 manifests in a docker manifest list.
    let d_amd64 = Image::new(&[&[("arch", "docker amd64\n")]], "d-amd64", "amd64").docker();
    let d_arm64 = Image::new(&[&[("arch", "docker arm64\n")]], "d-arm64", "arm64").docker();
    for (img, tag) in [(&d_arm64, "d-arm64"), (&d_amd64, "d-amd64")] {
        reg.push("test/docker", tag, img);
    }
    let list = index(
        DOCKER_LIST,
        DOCKER_MANIFEST,
        &[(&d_arm64, "arm64"), (&d_amd64, "amd64")],
    );
    reg.push_manifest("test/docker", "latest", DOCKER_LIST, list.as_bytes());
    let docker = format!("{}/test/docker", reg.addr);
    c.ok(&["image", "pull", "--insecure", &docker]);
    assert_eq!(c.inspect(&docker)["Manifest"], d_amd64.digest());
    assert_eq!(c.rootfs_file(&docker, "arch"), "docker amd64\n");

    // An index without linux/amd64.
    let arm_only = index(OCI_INDEX, OCI_MANIFEST, &[(&arm64, "arm64")]);
    reg.push_manifest("test/multi", "armonly", OCI_INDEX, arm_only.as_bytes());
    c.fails(
        &["image", "pull", "--insecure", &format!("{multi}:armonly")],
        "linux/amd64",
    );
    assert!(c.tmp_is_empty());
}

#[test]
fn a_registry_with_basic_auth_needs_the_credentials() {
    let reg = Registry::start(Some(("tester", "s3cret")));
    let img = Image::new(&[&[("f", "authorized\n")]], "sh", "amd64");
    reg.push("private/img", "1", &img);
    let c = Client::new();
    let reference = format!("{}/private/img:1", reg.addr);
    let out = c.pulls_only_as_tester_with_s3cret(&reference);
    assert!(out.starts_with("Pulled"), "{out}");
    assert_eq!(c.inspect(&reference)["Manifest"], img.digest());
}

/// What the hostile registry does with the layer blob.
#[derive(Clone, Copy)]
enum Lie {
    /// Sends other bytes of the same length.
    WrongContent,
    /// Sends half of the blob and closes the connection.
    DiesMidBlob,
}

/// Serves one image, lying about its layer as `lie` says; with `token`,
/// only to clients holding a bearer token its /token endpoint gives for
/// tester:s3cret. Returns the address.
fn fake_registry(img: &Image, lie: Option<Lie>, token: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let manifest = img.manifest.clone();
    let blobs = img.blobs.clone();
    let realm = format!("http://{addr}/token");
    let login = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("tester:s3cret")
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            let mut authorization = String::new();
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        authorization = v.trim().to_owned();
                    }
                }
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_owned();
            let reply = |conn: &mut TcpStream, ctype: &str, body: &[u8], send: usize| {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                     Docker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    sha256(body)
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body[..send]);
            };
            if token && path.starts_with("/token") {
                if authorization == login {
                    let body =
                        br#"{"token":"good-token","access_token":"good-token","expires_in":300}"#;
                    reply(&mut conn, "application/json", body, body.len());
                } else {
                    let _ =
                        conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
                }
                continue;
            }
            if token && authorization != "Bearer good-token" {
                let head = format!(
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",\
                     service=\"fake\",scope=\"repository:evil/img:pull\"\r\n\
                     Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
                );
                let _ = conn.write_all(head.as_bytes());
                continue;
            }
            if path == "/v2/" {
                reply(&mut conn, "application/json", b"{}", 2);
            } else if path.contains("/manifests/") {
                reply(&mut conn, OCI_MANIFEST, &manifest, manifest.len());
            } else if let Some(b) = blobs.iter().find(|b| path.ends_with(&sha256(b))) {
                let is_layer = !std::ptr::eq(b, &blobs[0]);
                match (is_layer, lie) {
                    (true, Some(Lie::WrongContent)) => {
                        let mut other = b.clone();
                        for x in other.iter_mut() {
                            *x = x.wrapping_add(1);
                        }
                        // The header digest is of what is sent, so only the
                        // descriptor's digest can catch it.
                        reply(&mut conn, "application/octet-stream", &other, other.len())
                    }
                    (true, Some(Lie::DiesMidBlob)) => {
                        reply(&mut conn, "application/octet-stream", b, b.len() / 2)
                    }
                    _ => reply(&mut conn, "application/octet-stream", b, b.len()),
                }
            } else {
                let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    addr
}

#[test]
fn a_token_registry_gives_access_for_the_right_credentials_only() {
    let img = Image::new(&[&[("t", "behind a token\n")]], "sh", "amd64");
    let addr = fake_registry(&img, None, true);
    let reference = format!("{addr}/evil/img:1");
    let c = Client::new();
    c.pulls_only_as_tester_with_s3cret(&reference);
    assert_eq!(c.rootfs_file(&reference, "t"), "behind a token\n");
}

#[test]
fn a_lying_or_dying_registry_fails_the_pull_and_leaves_no_partial_blob() {
    let big: String = (0..200_000).map(|i| format!("{i:x}")).collect();
    let img = Image::new(&[&[("big", &big)]], "sh", "amd64");
    let layer_hex = sha256(&img.blobs[1])
        .trim_start_matches("sha256:")
        .to_owned();
    for (lie, want) in [
        (Lie::WrongContent, "hashes to"),
        (Lie::DiesMidBlob, "cannot pull"),
    ] {
        let addr = fake_registry(&img, Some(lie), false);
        let c = Client::new();
        let err = c.fails(
            &["image", "pull", "--insecure", &format!("{addr}/evil/img:1")],
            want,
        );
        assert!(!c.blobs().contains(&layer_hex), "{err}");
        assert!(c.tmp_is_empty(), "partial download left in tmp/");
        assert_eq!(c.ok(&["image", "ls", "-q"]), "", "{err}");
        assert!(c
            .fails(
                &["image", "inspect", &format!("{addr}/evil/img:1")],
                "no image"
            )
            .contains("no image"));
    }
}

#[test]
fn a_pull_resumes_with_the_blobs_it_lacks_and_concurrent_pulls_agree() {
    let reg = Registry::start(None);
    let img = Image::new(
        &[&[("a", "one\n")], &[("b", "two\n")], &[("c", "three\n")]],
        "sh",
        "amd64",
    );
    reg.push("test/resume", "1", &img);
    let c = Client::new();
    let reference = format!("{}/test/resume:1", reg.addr);
    let store = c.store().to_str().unwrap().to_owned();
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            Command::new(runvm_binary())
                .args(["--store", &store, "image", "pull", "--insecure", &reference])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for p in pulls {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(c.ok(&["image", "ls", "-q"]).lines().count(), 1);
    assert_eq!(c.blobs().len(), 5);
    // Lose a layer (as if the last pull had been cut short): the next pull
    // fetches only it, and the image is whole again.
    let layer = sha256(&img.blobs[2])
        .trim_start_matches("sha256:")
        .to_owned();
    std::fs::remove_file(c.store().join("blobs/sha256").join(&layer)).unwrap();
    let (ok, _, err) = c.run(&["image", "pull", "--insecure", &reference], "");
    assert!(ok, "{err}");
    assert_eq!(err.matches("already here").count(), 3, "{err}");
    assert_eq!(err.matches("pulling").count(), 1, "{err}");
    assert_eq!(c.rootfs_file(&reference, "b"), "two\n");
    assert!(c.tmp_is_empty());
}
