//! The store end to end: create, import (docker save, OCI layout,
//! multi-platform), unpack, names, holds, removal and collection.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{Digest, ImageError, RunSettings, Store};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("store")).unwrap();
    (dir, s)
}

fn tree(dir: &Path, files: &[(&str, &str)]) {
    for (p, content) in files {
        let p = dir.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
}

fn tar_of(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

fn staged_is_empty(s: &Store) -> bool {
    fs::read_dir(s.tmp()).unwrap().count() == 0
}

/// A `docker save` archive of one image with the given layers (as
/// directories), written as a tarball; `break_diff_id` lies in the config.
fn docker_archive(work: &Path, tags: &[&str], layers: &[&Path], break_diff_id: bool) -> PathBuf {
    let out = work.join(format!("archive-{}", layers.len()));
    fs::create_dir_all(&out).unwrap();
    let mut names = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let bytes = tar_of(l);
        let d = Digest::sha256_of(&bytes);
        diff_ids.push(if break_diff_id {
            Digest::sha256_of(b"lie").to_string()
        } else {
            d.to_string()
        });
        let name = format!("{i}/layer.tar");
        fs::create_dir_all(out.join(i.to_string())).unwrap();
        fs::write(out.join(&name), bytes).unwrap();
        names.push(name);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM=archive"], "Cmd": ["sh"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let cfg_name = format!("{}.json", Digest::sha256_of(config.as_bytes()).encoded());
    fs::write(out.join(&cfg_name), &config).unwrap();
    let manifest = serde_json::json!([{"Config": cfg_name, "RepoTags": tags, "Layers": names}]);
    fs::write(out.join("manifest.json"), manifest.to_string()).unwrap();
    let tarball = work.join(format!("archive-{}.tar", layers.len()));
    fs::write(&tarball, tar_of(&out)).unwrap();
    tarball
}

#[test]
fn an_image_made_from_a_directory_unpacks_to_that_directory() {
    let (dir, s) = store();
    let src = dir.path().join("src");
    tree(&src, &[("bin/hello", "hi"), ("etc/motd", "welcome")]);
    std::os::unix::fs::symlink("hello", src.join("bin/alias")).unwrap();
    let settings = RunSettings {
        cmd: vec!["sh".into()],
        env: vec!["A=1".into()],
        ..Default::default()
    };
    let rec = s.create_from_dir(&src, "tiny:1", &settings).unwrap();
    assert_eq!(rec.names, ["docker.io/library/tiny:1"]);
    assert_eq!(s.find("tiny:1").unwrap(), rec);
    assert_eq!(s.find(rec.short_id()).unwrap(), rec);
    assert!(matches!(s.find("tiny"), Err(ImageError::NotFound(_))));
    let cfg = s.config(&rec).unwrap();
    let c = cfg.config().as_ref().unwrap();
    assert_eq!(c.cmd().as_ref().unwrap(), &["sh".to_string()]);
    let mut events = 0;
    let root = s.rootfs(&rec, &mut |_| events += 1).unwrap();
    assert_eq!(events, 2);
    assert_eq!(
        fs::read_to_string(root.join("etc/motd")).unwrap(),
        "welcome"
    );
    assert_eq!(
        fs::read_link(root.join("bin/alias")).unwrap(),
        Path::new("hello")
    );
    // Unpacked once: the second call does no work.
    let again = s.rootfs(&rec, &mut |_| panic!("unpacked twice")).unwrap();
    assert_eq!(again, root);
    assert!(staged_is_empty(&s));
}

#[test]
fn a_docker_save_archive_imports_with_its_tags_and_layers_in_order() {
    let (dir, s) = store();
    let (l1, l2) = (dir.path().join("l1"), dir.path().join("l2"));
    tree(&l1, &[("etc/os", "base"), ("gone", "x")]);
    tree(&l2, &[("etc/os", "top"), (".wh.gone", "")]);
    let tarball = docker_archive(
        dir.path(),
        &["app:v1", "localhost:5000/app:v1"],
        &[&l1, &l2],
        false,
    );
    let recs = s.import(&tarball, None).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].names,
        ["docker.io/library/app:v1", "localhost:5000/app:v1"]
    );
    let root = s.rootfs(&recs[0], &mut |_| {}).unwrap();
    assert_eq!(fs::read_to_string(root.join("etc/os")).unwrap(), "top");
    assert!(!root.join("gone").exists());
    let cfg = s.config(&recs[0]).unwrap();
    assert_eq!(
        cfg.config().as_ref().unwrap().working_dir().as_deref(),
        Some("/srv")
    );
    // Importing again changes nothing; a name given overrides the tags.
    assert_eq!(s.import(&tarball, None).unwrap(), recs);
    let renamed = s.import(&tarball, Some("other")).unwrap();
    assert!(renamed[0]
        .names
        .contains(&"docker.io/library/other:latest".to_string()));
    assert_eq!(s.images().unwrap().len(), 1);
    assert!(staged_is_empty(&s));
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_fails_the_unpack_and_leaves_no_rootfs() {
    let (dir, s) = store();
    let l1 = dir.path().join("l1");
    tree(&l1, &[("f", "x")]);
    let tarball = docker_archive(dir.path(), &["bad:1"], &[&l1], true);
    let rec = s.import(&tarball, None).unwrap().remove(0);
    let e = s.rootfs(&rec, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("config says"), "{e}");
    assert_eq!(fs::read_dir(s.root().join("rootfs")).unwrap().count(), 0);
    assert!(staged_is_empty(&s));
}

#[test]
fn an_oci_layout_with_an_index_imports_the_linux_amd64_image() {
    let (dir, s) = store();
    let layout = dir.path().join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::sha256_of(bytes);
        fs::write(layout.join("blobs/sha256").join(d.encoded()), bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let image_for = |arch: &str| {
        let src = dir.path().join(arch);
        tree(&src, &[("arch", arch)]);
        let layer = tar_of(&src);
        let diff = Digest::sha256_of(&layer).to_string();
        let (ld, ls) = put(&layer);
        let config = serde_json::json!({"architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff]}});
        let (cd, cs) = put(config.to_string().as_bytes());
        let m = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]});
        let (md, ms) = put(m.to_string().as_bytes());
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms, "platform": {"architecture": arch, "os": "linux"}})
    };
    let list = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [image_for("arm64"), image_for("amd64")]});
    let (xd, xs) = put(list.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": xd, "size": xs,
        "annotations": {"org.opencontainers.image.ref.name": "example.com/multi:2"}}]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let rec = s.import(&layout, None).unwrap().remove(0);
    assert_eq!(rec.names, ["example.com/multi:2"]);
    let root = s.rootfs(&rec, &mut |_| {}).unwrap();
    assert_eq!(fs::read_to_string(root.join("arch")).unwrap(), "amd64");
    // A blob that lies about its content is refused, and nothing is named.
    let (dir2, s2) = store();
    let bad = dir2.path().join("bad");
    fs::create_dir_all(bad.join("blobs/sha256")).unwrap();
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), bad.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    fs::copy(layout.join("index.json"), bad.join("index.json")).unwrap();
    fs::copy(layout.join("oci-layout"), bad.join("oci-layout")).unwrap();
    fs::write(
        bad.join("blobs/sha256")
            .join(xd.strip_prefix("sha256:").unwrap()),
        b"{}",
    )
    .unwrap();
    assert!(matches!(
        s2.import(&bad, None),
        Err(ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. })
    ));
    assert!(s2.images().unwrap().is_empty());
}

#[test]
fn a_hostile_or_foreign_archive_is_refused_and_leaves_the_store_as_it_was() {
    let (dir, s) = store();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..14].copy_from_slice(b"../../escaped!");
    h.set_size(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend([0; 1024]);
    let evil = dir.path().join("evil.tar");
    fs::write(&evil, bytes).unwrap();
    let e = s.import(&evil, None).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    let junk = dir.path().join("junk.tar");
    fs::write(&junk, tar_of(&dir.path().join("store/rootfs"))).unwrap();
    assert!(s
        .import(&junk, None)
        .unwrap_err()
        .to_string()
        .contains("neither"));
    assert!(s.import(&dir.path().join("missing"), None).is_err());
    assert!(s.images().unwrap().is_empty() && staged_is_empty(&s));
    assert!(s.blobs().list().unwrap().is_empty());
}

#[test]
fn removal_untags_refuses_held_images_and_collects_blobs() {
    let (dir, s) = store();
    let src = dir.path().join("src");
    tree(&src, &[("f", "1")]);
    let rec = s
        .create_from_dir(&src, "one", &RunSettings::default())
        .unwrap();
    s.rootfs(&rec, &mut |_| {}).unwrap();
    s.hold("c1", &rec).unwrap();
    assert_eq!(s.holders(&rec), ["c1"]);
    let e = s.remove("one", false).unwrap_err();
    assert!(matches!(e, ImageError::InUse { .. }), "{e}");
    s.release("c1").unwrap();
    let done = s.remove("one", false).unwrap();
    assert!(done.iter().any(|l| l.starts_with("Deleted:")), "{done:?}");
    assert!(matches!(s.find("one"), Err(ImageError::NotFound(_))));
    assert_eq!(fs::read_dir(s.root().join("rootfs")).unwrap().count(), 0);
    assert!(s.blobs().list().unwrap().is_empty());
    assert!(s.hold("../x", &rec).is_err());
}

#[test]
fn an_image_with_two_names_loses_one_at_a_time_and_force_overrides_holds() {
    let (dir, s) = store();
    let l1 = dir.path().join("l1");
    tree(&l1, &[("f", "x")]);
    let tarball = docker_archive(dir.path(), &["a:1", "b:1"], &[&l1], false);
    let rec = s.import(&tarball, None).unwrap().remove(0);
    s.hold("c1", &rec).unwrap();
    assert_eq!(
        s.remove("a:1", false).unwrap(),
        ["Untagged: docker.io/library/a:1"]
    );
    assert!(s.remove("b:1", false).is_err());
    s.remove("b:1", true).unwrap();
    assert!(s.images().unwrap().is_empty());
    assert!(s.blobs().list().unwrap().is_empty());
}

#[test]
fn concurrent_imports_and_unpacks_of_one_image_agree() {
    let (dir, s) = store();
    let l1 = dir.path().join("l1");
    tree(&l1, &[("f", "x"), ("d/g", "y")]);
    let tarball = docker_archive(dir.path(), &["same:1"], &[&l1], false);
    let roots: Vec<PathBuf> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                sc.spawn(|| {
                    let rec = s.import(&tarball, None).unwrap().remove(0);
                    s.rootfs(&rec, &mut |_| {}).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.images().unwrap().len(), 1);
    assert_eq!(fs::read_to_string(roots[0].join("d/g")).unwrap(), "y");
    assert!(staged_is_empty(&s));
}
