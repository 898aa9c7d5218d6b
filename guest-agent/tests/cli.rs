use std::process::Command;

#[test]
fn refuses_to_run_outside_a_guest_as_a_normal_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_runvm-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as PID 1"), "{err}");
}

#[test]
fn version_reports_the_protocol() {
    let out = Command::new(env!("CARGO_BIN_EXE_runvm-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("protocol {}", runvm_protocol::PROTOCOL_VERSION);
    assert!(text.contains(&want), "{text}");
}
