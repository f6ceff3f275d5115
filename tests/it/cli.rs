//! The command line as a user meets it: help, version, and errors that say what to do.

use crate::rewind;

#[test]
fn help_and_version() {
    let help = rewind::run_ok(&["--help"]);
    assert!(help.contains("vms") && help.contains("--connect"), "{help}");
    let version = rewind::run_ok(&["--version"]);
    assert_eq!(version.trim(), format!("rewind {}", rewind_core::VERSION));
}

fn fails_with(args: &[&str], expected: &[&str]) {
    let out = rewind::run(args);
    assert!(!out.status.success(), "rewind {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: "),
        "one line starting with `error:`: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for word in expected {
        assert!(
            stderr.contains(word),
            "stderr should mention {word:?}: {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "nothing on stdout");
}

#[test]
fn daemon_not_running_says_how_to_start_it() {
    fails_with(
        &[
            "vms",
            "--connect",
            "qemu:///system?socket=/nonexistent/libvirt-sock",
        ],
        &["not running", "systemctl start libvirtd", "libvirtd -d"],
    );
}

#[test]
fn unknown_uri_says_which_uris_work() {
    fails_with(
        &["vms", "--connect", "bogus:///x"],
        &["no driver", "qemu:///system", "bogus:///x"],
    );
}

#[test]
fn unreachable_remote_host_is_named() {
    fails_with(
        &[
            "vms",
            "--connect",
            "qemu+ssh://nobody@127.0.0.1:1/system?no_tty=1",
        ],
        &["cannot connect", "127.0.0.1"],
    );
}

#[test]
fn bad_arguments_are_explained() {
    let out = rewind::run(&["vms", "--frobnicate"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error:") && stderr.contains("--frobnicate"),
        "{stderr}"
    );
}
