//! The man pages and shell completions the package installs (`rewind generate`), as a user
//! meets them: `man` renders every page without a warning, and each completion script
//! loads in its shell and completes the real commands.

use std::path::Path;
use std::process::{Command, Output};

use rewind_tests::scratch::ScratchDir;

use crate::rewind;

/// The commands `rewind ARGS... --help` lists, without `help`.
fn commands_listed(args: &[&str]) -> Vec<String> {
    let help = rewind::run_ok(&[args, &["--help"]].concat());
    help.lines()
        .skip_while(|line| line.trim_end() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        // A command's line starts with two spaces; its wrapped description is indented more.
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// `rewind.1`, and `rewind-COMMAND[-SUBCOMMAND].1` for every command `--help` lists, at
/// every level.
fn expected_pages(path: &[&str], pages: &mut Vec<String>) {
    pages.push(format!(
        "{}.1",
        ["rewind"]
            .iter()
            .chain(path)
            .copied()
            .collect::<Vec<_>>()
            .join("-")
    ));
    for command in commands_listed(path) {
        let mut deeper = path.to_vec();
        deeper.push(&command);
        expected_pages(&deeper, pages);
    }
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Runs `command` (`what`) and panics with everything it said unless it succeeded; a
/// program that is not installed fails the test too.
fn run_ok(what: &str, command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "could not run {what} ({e}): install it (./x test installs the test packages, \
             TEST_PACKAGES in ./x)"
        )
    });
    rewind_tests::assert_success(what, &out);
    out
}

#[test]
fn generate_man_writes_one_page_per_command_and_every_page_renders() {
    let dir = ScratchDir::new("man-pages").unwrap();
    let out = dir.path().join("man1");
    let listed = rewind::run_ok(&["generate", "man", "--out", out.to_str().unwrap()]);

    let mut expected = Vec::new();
    expected_pages(&[], &mut expected);
    expected.sort();
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
        let path = out.join(page);
        let rendered = run_ok(
            &format!("man -l {page}"),
            Command::new("man")
                .args(["--warnings=all,mac", "-l"])
                .arg(&path)
                .env("MANWIDTH", "80")
                .env("MAN_KEEP_STDERR", "1")
                .env("MANPAGER", "cat")
                .env("LC_ALL", "C.UTF-8"),
        );
        let stderr = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            stderr.trim().is_empty(),
            "groff warns about {page}: {stderr}"
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        let name = page.trim_end_matches(".1");
        assert!(
            text.starts_with(&format!("{}(1)", name.to_uppercase())),
            "{page} is titled after its command:\n{text}"
        );
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "SEE ALSO"] {
            assert!(
                text.lines().any(|line| line == section),
                "{page} has no {section} section:\n{text}"
            );
        }
        assert!(text.contains(name), "{page} names {name}:\n{text}");
    }

    let top = String::from_utf8_lossy(
        &run_ok(
            "man -l rewind.1",
            Command::new("man")
                .arg("-l")
                .arg(out.join("rewind.1"))
                .env("MANWIDTH", "200")
                .env("LC_ALL", "C.UTF-8"),
        )
        .stdout,
    )
    .into_owned();
    for command in commands_listed(&[]) {
        assert!(
            top.contains(&format!("rewind-{command}(1)")),
            "rewind(1) lists {command}:\n{top}"
        );
    }
}

#[test]
fn generate_completions_load_in_bash_zsh_and_fish() {
    let dir = ScratchDir::new("completions").unwrap();
    let out = dir.path().join("completions");
    rewind::run_ok(&["generate", "completions", "--out", out.to_str().unwrap()]);
    assert_eq!(file_names(&out), ["_rewind", "rewind.bash", "rewind.fish"]);
    let commands = commands_listed(&[]);
    assert!(
        commands.contains(&"undo-restore".to_owned()),
        "{commands:?}"
    );

    // Each shell starts without the user's configuration and keeps its files in the scratch
    // folder.
    let shell = |program: &str, no_config: &str, script: &str, file: &str| {
        let mut command = Command::new(program);
        command
            .args([no_config, "-c"])
            .arg(script)
            .env("SCRIPT", out.join(file))
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .env("ZDOTDIR", dir.path());
        command
    };

    // bash: the script registers `_rewind` for `rewind`, which offers the commands.
    let bash = run_ok(
        "bash",
        &mut shell(
            "bash",
            "--norc",
            r#"source "$SCRIPT" && complete -p rewind &&
               COMP_WORDS=(rewind '') && COMP_CWORD=1 && _rewind rewind '' rewind &&
               printf '%s\n' "${COMPREPLY[@]}""#,
            "rewind.bash",
        ),
    );
    let bash = String::from_utf8_lossy(&bash.stdout);
    assert!(
        bash.lines()
            .next()
            .unwrap_or("")
            .contains("-F _rewind rewind"),
        "{bash}"
    );
    for command in &commands {
        assert!(
            bash.lines().any(|l| l == command),
            "bash offers {command}:\n{bash}"
        );
    }
    assert!(!bash.lines().any(|l| l == "generate"), "hidden: {bash}");

    // zsh: the script defines `_rewind` and registers it for `rewind` with compinit.
    let zsh = run_ok(
        "zsh",
        &mut shell(
            "zsh",
            "-f",
            r#"autoload -U compinit && compinit -u -D && source "$SCRIPT" &&
               whence -v _rewind && print -r -- "completes rewind with $_comps[rewind]""#,
            "_rewind",
        ),
    );
    let zsh_out = String::from_utf8_lossy(&zsh.stdout);
    assert!(
        zsh_out.contains("_rewind is a shell function")
            && zsh_out.contains("completes rewind with _rewind"),
        "{zsh_out}"
    );
    assert!(
        zsh.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&zsh.stderr)
    );

    // fish: `complete -C` completes `rewind ` with the commands and their descriptions.
    let fish = run_ok(
        "fish",
        &mut shell(
            "fish",
            "--no-config",
            r#"source $SCRIPT; and complete -C "rewind ""#,
            "rewind.fish",
        ),
    );
    let fish = String::from_utf8_lossy(&fish.stdout);
    for command in &commands {
        assert!(
            fish.lines()
                .any(|l| l.split('\t').next() == Some(command.as_str())),
            "fish offers {command}:\n{fish}"
        );
    }
    assert!(!fish.contains("generate"), "hidden: {fish}");
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
