use std::process::Command;

fn runvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runvm"))
        .args(args)
        .output()
        .expect("spawn runvm")
}

#[test]
fn version_names_the_runtime_and_spec() {
    let out = runvm(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("runvm {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("spec: 1.2.0"), "{text}");
}

#[test]
fn unknown_options_fail_with_a_message() {
    let out = runvm(&["--no-such-flag"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn no_command_is_an_error_not_a_panic() {
    let out = runvm(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no command given"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
