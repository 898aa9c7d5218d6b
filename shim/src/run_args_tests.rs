use super::*;

fn args(a: &[&str]) -> RunArgs {
    RunArgs::try_parse_from(a).unwrap()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
                      app:x:1000:1000:App:/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\nstaff:x:50:\napp:x:1000:\n";

#[test]
fn the_command_after_the_image_keeps_its_own_flags() {
    let a = args(&["--rm", "-e", "A=1", "busybox", "ls", "-l", "--rm"]);
    assert!(a.rm);
    assert_eq!(a.image, "busybox");
    assert_eq!(a.command, strings(&["ls", "-l", "--rm"]));
    let a = args(&["busybox", "-x"]);
    assert_eq!(a.command, strings(&["-x"]));
}

#[test]
fn the_form_follows_runcs_flags_and_a_bundle_in_the_current_directory() {
    let f = |a: &[&str], cfg| form(&strings(a), cfg);
    assert_eq!(f(&["ID", "--bundle", "/b"], false), RunForm::Oci);
    assert_eq!(f(&["--bundle=/b", "ID"], false), RunForm::Oci);
    assert_eq!(f(&["-d", "ID", "--pid-file", "p"], false), RunForm::Oci);
    assert_eq!(f(&["ID"], true), RunForm::Oci);
    assert_eq!(f(&["-d", "ID"], true), RunForm::Oci);
    assert_eq!(f(&["busybox"], false), RunForm::Image);
    assert_eq!(f(&["busybox", "echo", "hi"], true), RunForm::Image);
    assert_eq!(f(&["--rm", "busybox"], true), RunForm::Image);
    // A runc flag in the container's command is the command's.
    assert_eq!(f(&["busybox", "ls", "-b"], false), RunForm::Image);
    assert_eq!(f(&["-e", "--bundle", "busybox"], false), RunForm::Image);
    assert_eq!(f(&[], false), RunForm::Image);
}

#[test]
fn users_resolve_in_the_images_passwd_and_group() {
    let u = resolve_user("", PASSWD, GROUP).unwrap();
    assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    let u = resolve_user("app", PASSWD, GROUP).unwrap();
    assert_eq!((u.uid, u.gid), (1000, 1000));
    assert_eq!(u.additional_gids, vec![10]);
    assert_eq!(u.home, "/home/app");
    let u = resolve_user("1000:staff", PASSWD, GROUP).unwrap();
    assert_eq!((u.uid, u.gid), (1000, 50));
    assert!(u.additional_gids.is_empty());
    let u = resolve_user("4242:7", PASSWD, GROUP).unwrap();
    assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 7, "/"));
    let u = resolve_user("4242", "", "").unwrap();
    assert_eq!((u.uid, u.gid), (4242, 0));
    let e = resolve_user("nobody", PASSWD, GROUP).unwrap_err();
    assert!(
        format!("{e:#}").contains("unable to find user nobody"),
        "{e:#}"
    );
    let e = resolve_user("app:nogroup", PASSWD, GROUP).unwrap_err();
    assert!(
        format!("{e:#}").contains("unable to find group nogroup"),
        "{e:#}"
    );
    let e = resolve_user("bad", "bad:x:zz:0::/:/bin/sh\n", "").unwrap_err();
    assert!(format!("{e:#}").contains("invalid uid"), "{e:#}");
}

#[test]
fn memory_sizes_parse_like_dockers() {
    assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
    assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
    assert_eq!(parse_memory("10240k").unwrap(), 10 << 20);
    assert_eq!(parse_memory("8mb").unwrap(), 8 << 20);
    assert_eq!(parse_memory("7340032").unwrap(), 7 << 20);
    for bad in ["", "m", "1t", "-5m", "1.5g", "99999999999999g"] {
        assert!(parse_memory(bad).is_err(), "{bad}");
    }
    assert!(format!("{:#}", parse_memory("1m").unwrap_err()).contains("too small"));
}

#[test]
fn volumes_need_absolute_existing_paths() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().to_str().unwrap();
    let v = parse_volume(&format!("{host}:/data")).unwrap();
    assert_eq!((v.guest.as_str(), v.read_only), ("/data", false));
    assert!(parse_volume(&format!("{host}:/data:ro")).unwrap().read_only);
    for (bad, want) in [
        ("vol:/data".to_string(), "named volumes"),
        (format!("{host}:data"), "must be absolute"),
        (format!("{host}:/"), "must be absolute"),
        (format!("{host}:/a/../b"), "must be absolute"),
        (format!("{host}:/data:rx"), "use ro or rw"),
        (format!("{host}/missing:/data"), "does not exist"),
        ("/a:/b:/c:/d".to_string(), "use /HOST:/GUEST"),
    ] {
        let e = format!("{:#}", parse_volume(&bad).unwrap_err());
        assert!(e.contains(want), "{bad}: {e}");
    }
}

fn image() -> ImageRunConfig {
    ImageRunConfig {
        env: strings(&["PATH=/bin", "A=image", "B=image"]),
        entrypoint: strings(&["/entry"]),
        cmd: strings(&["default"]),
        working_dir: "/srv".into(),
        user: "app".into(),
    }
}

#[test]
fn entrypoint_and_command_follow_dockers_rules() {
    let img = image();
    assert_eq!(
        argv(&args(&["i"]), &img).unwrap(),
        strings(&["/entry", "default"])
    );
    assert_eq!(
        argv(&args(&["i", "x", "y"]), &img).unwrap(),
        strings(&["/entry", "x", "y"])
    );
    assert_eq!(
        argv(&args(&["--entrypoint", "/sh", "i", "-c", "true"]), &img).unwrap(),
        strings(&["/sh", "-c", "true"])
    );
    // A new entrypoint drops the image's Cmd.
    assert_eq!(
        argv(&args(&["--entrypoint", "/sh", "i"]), &img).unwrap(),
        strings(&["/sh"])
    );
    assert_eq!(
        argv(&args(&["--entrypoint", "", "i", "ls"]), &img).unwrap(),
        strings(&["ls"])
    );
    let e = argv(&args(&["i"]), &ImageRunConfig::default()).unwrap_err();
    assert!(format!("{e:#}").contains("no command specified"));
}

#[test]
fn the_environment_layers_image_options_and_dockers_variables() {
    let a = args(&["-e", "B=cli", "-e", "C", "-e", "D", "-t", "i"]);
    let host = |k: &str| (k == "C").then(|| "host".to_string());
    let env = environment(&a, &image(), "abc123", "/home/app", host).unwrap();
    assert_eq!(
        env,
        strings(&[
            "HOSTNAME=abc123",
            "TERM=xterm",
            "PATH=/bin",
            "A=image",
            "B=cli",
            "C=host",
            "HOME=/home/app"
        ])
    );
    let env = environment(&args(&["i"]), &ImageRunConfig::default(), "h", "/", |_| {
        None
    })
    .unwrap();
    assert_eq!(env[0], format!("PATH={DEFAULT_PATH}"));
    assert!(environment(&args(&["-e", "=x", "i"]), &image(), "h", "/", |_| None).is_err());
}

#[test]
fn the_spec_carries_the_image_config_and_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().to_str().unwrap();
    let a = args(&[
        "--annotation",
        "io.runvm.vcpus=2",
        "-v",
        &format!("{vol}:/data:ro"),
        "-m",
        "64m",
        "--cpus",
        "1.5",
        "-w",
        "/tmp",
        "i",
        "echo",
        "hi",
    ]);
    let img = image();
    let inputs = SpecInputs {
        image: &img,
        rootfs: Path::new("/store/rootfs/abc"),
        hostname: "abc123",
        passwd: PASSWD,
        group: GROUP,
    };
    let s = spec(&a, &inputs, |_| None).unwrap();
    assert_eq!(s["root"]["path"], "/store/rootfs/abc");
    assert_eq!(s["annotations"][ANN_ROOTFS_OVERLAY], "true");
    assert_eq!(s["annotations"]["io.runvm.vcpus"], "2");
    assert!(check(&args(&["--annotation", "novalue", "i"])).is_err());
    assert_eq!(s["hostname"], "abc123");
    let p = &s["process"];
    assert_eq!(p["args"], json!(["/entry", "echo", "hi"]));
    assert_eq!(p["cwd"], "/tmp");
    assert_eq!(
        p["user"],
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10]})
    );
    assert_eq!(p["terminal"], false);
    assert!(p["capabilities"]["bounding"]
        .as_array()
        .unwrap()
        .contains(&json!("CAP_CHOWN")));
    let m = s["mounts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(m["destination"], "/data");
    assert_eq!(m["options"], json!(["rbind", "ro"]));
    assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
    assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 150_000);

    let relative = args(&["-w", "tmp", "i"]);
    let e = spec(&relative, &inputs, |_| None).unwrap_err();
    assert!(format!("{e:#}").contains("must be an absolute path"));
    let e = spec(&args(&["--cpus", "0", "i"]), &inputs, |_| None).unwrap_err();
    assert!(format!("{e:#}").contains("invalid --cpus"));
}

#[test]
fn image_config_fields_are_read_by_dockers_names() {
    let v = json!({"config": {"Env": ["A=1"], "Entrypoint": ["/e"], "Cmd": ["c"],
                   "WorkingDir": "/w", "User": "u"}});
    let c = ImageRunConfig::from_image_config(&v);
    assert_eq!(
        c,
        ImageRunConfig {
            env: strings(&["A=1"]),
            entrypoint: strings(&["/e"]),
            cmd: strings(&["c"]),
            working_dir: "/w".into(),
            user: "u".into(),
        }
    );
    assert_eq!(
        ImageRunConfig::from_image_config(&json!({})),
        ImageRunConfig::default()
    );
}

#[test]
fn the_network_is_none_the_bridge_or_an_existing_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ns = dir.path().join("ns");
    std::fs::write(&ns, "").unwrap();
    assert_eq!(network_path("none").unwrap(), None);
    // The bridge's namespace is made with the container (join_network).
    assert_eq!(network_path("bridge").unwrap(), None);
    assert_eq!(
        network_path(&format!("ns:{}", ns.display())).unwrap(),
        Some(ns.clone())
    );
    for (bad, want) in [
        ("host", "not possible"),
        ("overlay", "not supported"),
        ("ns:rel", "absolute path"),
        ("ns:/no/such/ns", "does not exist"),
    ] {
        let e = format!("{:#}", network_path(bad).unwrap_err());
        assert!(e.contains(want), "{bad}: {e}");
    }
    let img = image();
    let inputs = inputs_for(&img);
    let net = |opt: &str| {
        let s = spec(&args(&["--network", opt, "i"]), &inputs, |_| None).unwrap();
        s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] == "network")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(net("none"), vec![json!({"type": "network"})]);
    assert_eq!(
        net(&format!("ns:{}", ns.display())),
        vec![json!({"type": "network", "path": ns})]
    );
    let mut s = spec(&args(&["--network", "bridge", "i"]), &inputs, |_| None).unwrap();
    join_network(&mut s, Path::new("/run/netns/runvm-c")).unwrap();
    let nets: Vec<_> = s["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["type"] == "network")
        .collect();
    assert_eq!(
        nets,
        [&json!({"type": "network", "path": "/run/netns/runvm-c"})]
    );
}

/// Inputs with `img` and the test passwd and group files.
fn inputs_for(img: &ImageRunConfig) -> SpecInputs<'_> {
    SpecInputs {
        image: img,
        rootfs: Path::new("/r"),
        hostname: "h",
        passwd: PASSWD,
        group: GROUP,
    }
}

#[test]
fn published_ports_become_the_annotation_and_need_a_network() {
    let img = image();
    let inputs = inputs_for(&img);
    let s = spec(
        &args(&[
            "-p",
            "8080:80",
            "-p",
            "127.0.0.1:8443:443/tcp",
            "-p",
            "5353:53/udp",
            "--network",
            "bridge",
            "i",
        ]),
        &inputs,
        |_| None,
    )
    .unwrap();
    assert_eq!(
        s["annotations"]["io.runvm.publish"],
        "0.0.0.0:8080:80,127.0.0.1:8443:443,0.0.0.0:5353:53/udp"
    );
    for (a, why) in [
        (&["-p", "8080:80", "i"][..], "-p needs a network"),
        (
            &["-p", "53:53/sctp", "--network", "bridge", "i"],
            "tcp or udp",
        ),
    ] {
        let e = format!("{:#}", spec(&args(a), &inputs, |_| None).unwrap_err());
        assert!(e.contains(why), "{a:?}: {e}");
    }
}
