//! Checks of the files the Debian package installs, as a user meets them: `man` renders a
//! page without a warning, and each completion script loads in its shell and completes the
//! real commands. Shared by the tests of `rewind generate` (on freshly generated files) and
//! by `package-test` (on the installed ones). Each check panics, saying what is wrong.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `command` (`what`) and panics with everything it said unless it succeeded; a
/// program that is not installed fails too.
pub fn run_ok(what: &str, command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "could not run {what} ({e}): install it (./x test installs the test packages, \
             TEST_PACKAGES in ./x)"
        )
    });
    crate::assert_success(what, &out);
    out
}

/// The commands `binary ARGS... --help` lists, without `help`.
#[must_use]
pub fn commands_listed(binary: &Path, args: &[&str]) -> Vec<String> {
    let out = run_ok(
        &format!("{} {} --help", binary.display(), args.join(" ")),
        Command::new(binary).args(args).arg("--help"),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
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

/// The man page names `binary` documents: `rewind.1`, and `rewind-COMMAND[-SUBCOMMAND].1`
/// for every command `--help` lists, at every level; sorted.
#[must_use]
pub fn expected_man_pages(binary: &Path) -> Vec<String> {
    fn walk(binary: &Path, path: &[&str], pages: &mut Vec<String>) {
        let mut name = vec!["rewind"];
        name.extend_from_slice(path);
        pages.push(format!("{}.1", name.join("-")));
        for command in commands_listed(binary, path) {
            let mut deeper = path.to_vec();
            deeper.push(&command);
            walk(binary, &deeper, pages);
        }
    }
    let mut pages = Vec::new();
    walk(binary, &[], &mut pages);
    pages.sort();
    pages
}

/// `man -l PAGE` as a user reads it (80 columns, no pager).
fn man(page: &Path, width: u32) -> Output {
    run_ok(
        &format!("man -l {}", page.display()),
        Command::new("man")
            .args(["--warnings=all,mac", "-l"])
            .arg(page)
            .env("MANWIDTH", width.to_string())
            .env("MAN_KEEP_STDERR", "1")
            .env("MANPAGER", "cat")
            .env("LC_ALL", "C.UTF-8"),
    )
}

/// Checks that the page at `path` (plain or gzipped) renders without a warning, is titled
/// after its command, names it, and has the sections every page has.
pub fn check_man_page(path: &Path) {
    let rendered = man(path, 80);
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let stderr = String::from_utf8_lossy(&rendered.stderr);
    assert!(
        stderr.trim().is_empty(),
        "groff warns about {file}: {stderr}"
    );
    let text = String::from_utf8_lossy(&rendered.stdout).into_owned();
    let name = file.trim_end_matches(".gz").trim_end_matches(".1");
    assert!(
        text.starts_with(&format!("{}(1)", name.to_uppercase())),
        "{file} is titled after its command:\n{text}"
    );
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "SEE ALSO"] {
        assert!(
            text.lines().any(|line| line == section),
            "{file} has no {section} section:\n{text}"
        );
    }
    assert!(text.contains(name), "{file} names {name}:\n{text}");
    assert!(
        !text.contains('`'),
        "{file} shows Markdown backticks instead of bold:\n{text}"
    );
}

/// Checks that `rewind(1)` at `path` lists every command of `binary`.
pub fn check_top_page_lists_commands(binary: &Path, path: &Path) {
    let top = String::from_utf8_lossy(&man(path, 200).stdout).into_owned();
    for section in ["ENVIRONMENT", "FILES"] {
        assert!(
            top.lines().any(|line| line == section),
            "rewind(1) has no {section} section:\n{top}"
        );
    }
    for command in commands_listed(binary, &[]) {
        assert!(
            top.contains(&format!("rewind-{command}(1)")),
            "rewind(1) lists {command}:\n{top}"
        );
    }
}

/// The completion scripts to check.
#[derive(Debug)]
pub struct Completions<'a> {
    /// bash's (`rewind.bash`, installed as `completions/rewind`).
    pub bash: &'a Path,
    /// zsh's (`_rewind`).
    pub zsh: &'a Path,
    /// fish's (`rewind.fish`).
    pub fish: &'a Path,
}

/// Checks that each script loads in its shell, started without the user's configuration
/// and with its files in `scratch`, and completes `rewind ` with every command of `binary`
/// (and not the hidden `generate`).
pub fn check_completions(binary: &Path, scripts: &Completions<'_>, scratch: &Path) {
    let commands = commands_listed(binary, &[]);
    assert!(
        commands.contains(&"undo-restore".to_owned()),
        "{commands:?}"
    );
    let shell = |program: &str, no_config: &str, script: &str, file: &Path| {
        let mut command = Command::new(program);
        command
            .args([no_config, "-c"])
            .arg(script)
            .env("SCRIPT", file)
            .env("HOME", scratch)
            .env("XDG_CONFIG_HOME", scratch.join("config"))
            .env("XDG_DATA_HOME", scratch.join("data"))
            .env("XDG_CACHE_HOME", scratch.join("cache"))
            .env("ZDOTDIR", scratch);
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
            scripts.bash,
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
            scripts.zsh,
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
            scripts.fish,
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
