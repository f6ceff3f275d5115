//! The man pages and shell completions the package installs (`rewind generate`), as a user
//! meets them: `man` renders every page without a warning, and each completion script
//! loads in its shell and completes the real commands.

use std::path::Path;

use rewind_tests::package::{self, Completions};
use rewind_tests::scratch::ScratchDir;

use crate::rewind;

/// The names of the files in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn generate_man_writes_one_page_per_command_and_every_page_renders() {
    let dir = ScratchDir::new("man-pages").unwrap();
    let out = dir.path().join("man1");
    let listed = rewind::run_ok(&["generate", "man", "--out", out.to_str().unwrap()]);

    let binary = Path::new(env!("CARGO_BIN_EXE_rewind"));
    let expected = package::expected_man_pages(binary);
    assert!(
        expected.contains(&"rewind-restore.1".to_owned()),
        "{expected:?}"
    );
    let written = file_names(&out);
    assert_eq!(
        written, expected,
        "one page for rewind and for each command"
    );
    assert_eq!(
        listed.lines().count(),
        written.len(),
        "it names each page: {listed}"
    );
    for page in &written {
        package::check_man_page(&out.join(page));
    }
    package::check_top_page_lists_commands(binary, &out.join("rewind.1"));
}

#[test]
fn generate_completions_load_in_bash_zsh_and_fish() {
    let dir = ScratchDir::new("completions").unwrap();
    let out = dir.path().join("completions");
    rewind::run_ok(&["generate", "completions", "--out", out.to_str().unwrap()]);
    assert_eq!(file_names(&out), ["_rewind", "rewind.bash", "rewind.fish"]);
    package::check_completions(
        Path::new(env!("CARGO_BIN_EXE_rewind")),
        &Completions {
            bash: &out.join("rewind.bash"),
            zsh: &out.join("_rewind"),
            fish: &out.join("rewind.fish"),
        },
        dir.path(),
    );
}

#[test]
fn generate_into_an_unwritable_folder_says_so() {
    let dir = ScratchDir::new("generate-unwritable").unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = rewind::run(&[
        "generate",
        "man",
        "--out",
        file.join("man1").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: could not create the output folder")
            && stderr.contains("--out")
            && stderr.contains("a-file/man1"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
