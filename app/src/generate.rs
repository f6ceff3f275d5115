//! `rewind generate`: the man pages and shell completions that the package installs, made
//! from the command-line definition itself so that they never drift from it.
//!
//! Where the package puts them (Debian's conventions):
//!
//! | written                        | installed as                                      |
//! |--------------------------------|---------------------------------------------------|
//! | `rewind.1`, `rewind-COMMAND.1` | `/usr/share/man/man1/` (gzipped)                  |
//! | `rewind.bash`                  | `/usr/share/bash-completion/completions/rewind`   |
//! | `_rewind`                      | `/usr/share/zsh/vendor-completions/_rewind`       |
//! | `rewind.fish`                  | `/usr/share/fish/vendor_completions.d/rewind.fish`|

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

/// The program's name: of the man pages, and the command the completions complete.
const BIN: &str = "rewind";

/// The shells the package ships completions for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// DESCRIPTION of `rewind(1)`: longer than `rewind --help`'s one line.
const DESCRIPTION: &str = "\
Rewind takes checkpoints of the libvirt/QEMU virtual machines of a workstation \
(their disks, UEFI variables, TPM state and definition, and with --full-state their memory \
too) into backup stores, folders on this machine or on a removable drive, and brings a VM \
back to any checkpoint: in place, which can be undone, or as a new VM beside it.

Without a command, rewind opens the Rewind window; with --minimized it starts in the tray. \
The commands below do the same from a terminal or a script; rewind COMMAND --help, or \
man rewind-COMMAND, explains each.

Protected VMs are checkpointed on their schedule by the protection service (rewind \
service, run as root by systemd). The window, the tray and the command line of users in \
the libvirt group are its clients.";

/// `rewind generate WHAT`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: Generated,
}

/// What `rewind generate` writes.
#[derive(Debug, Subcommand)]
pub enum Generated {
    /// Write the man pages: rewind.1, and rewind-COMMAND.1 for every command
    Man {
        /// The folder to write them into (created if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write the shell completions: rewind.bash, _rewind (zsh) and rewind.fish
    Completions {
        /// The folder to write them into (created if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Why generating failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The output folder could not be created.
    #[error("could not create the output folder (choose another with --out): {}", path.display())]
    CreateFolder {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("could not write {what} (choose a folder you can write to with --out): {}", path.display())]
    Write {
        /// "the man page" or "the bash completion".
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes what `args` asks for, made from `cli` (the whole `rewind` command line), and
/// names each file written on `out`, one per line.
pub fn run(out: &mut dyn Write, cli: clap::Command, args: &GenerateArgs) -> anyhow::Result<()> {
    let written = match &args.what {
        Generated::Man { out: dir } => write_all(dir, man_pages(cli))?,
        Generated::Completions { out: dir } => write_all(dir, completions(&cli))?,
    };
    for path in written {
        writeln!(out, "{}", path.display())?;
    }
    Ok(())
}

/// A file to write: its name, what it is (for errors) and its contents.
#[derive(Debug)]
struct File {
    name: String,
    what: String,
    contents: Vec<u8>,
}

/// Creates `dir` and writes `files` into it; returns their paths.
fn write_all(dir: &Path, files: Vec<File>) -> Result<Vec<PathBuf>, GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::CreateFolder {
        path: dir.to_owned(),
        source,
    })?;
    files
        .into_iter()
        .map(|file| {
            let path = dir.join(&file.name);
            std::fs::write(&path, &file.contents).map_err(|source| GenerateError::Write {
                what: file.what,
                path: path.clone(),
                source,
            })?;
            Ok(path)
        })
        .collect()
}

/// The man pages: `rewind.1`, then one per command that `--help` lists, nested ones too
/// (`rewind-COMMAND-SUBCOMMAND.1`). Hidden commands and `help` get none.
fn man_pages(cli: clap::Command) -> Vec<File> {
    // NAME says "rewind - checkpoints and …", not "rewind - Rewind: checkpoints and …".
    let about = cli.get_about().map(|about| {
        let about = about.to_string();
        about
            .strip_prefix("Rewind: ")
            .map_or_else(|| about.clone(), str::to_owned)
    });
    let mut top = cli
        .name(BIN)
        .about(about.unwrap_or_default())
        .long_about(DESCRIPTION)
        .subcommand_help_heading("COMMANDS")
        .subcommand_value_name("COMMAND")
        .disable_help_subcommand(true);
    // Builds the subcommands too: their display names (`rewind-vms`) and the global
    // options they inherit.
    top.build();
    let mut pages = Vec::new();
    add_pages(&top, true, &mut pages);
    pages
}

/// Adds the page of `cmd` and of its visible subcommands, recursively.
fn add_pages(cmd: &clap::Command, top: bool, pages: &mut Vec<File>) {
    let man = Man::new(cmd.clone())
        .title(cmd.get_display_name().unwrap_or(BIN).to_uppercase())
        .source(format!("{BIN} {}", env!("CARGO_PKG_VERSION")))
        .manual("Rewind");
    pages.push(File {
        name: man.get_filename(),
        what: "the man page".to_owned(),
        contents: render_page(&man, cmd, top).into_bytes(),
    });
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        add_pages(sub, false, pages);
    }
}

/// A section of a page, as `clap_mangen` renders it.
type Section = fn(&Man, &mut dyn Write) -> std::io::Result<()>;

/// One page: `clap_mangen`'s sections (those `Man::render` writes, but VERSION: the footer
/// says it), then EXIT STATUS and SEE ALSO.
fn render_page(man: &Man, cmd: &clap::Command, top: bool) -> String {
    let mut sections: Vec<Section> = vec![
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
    ];
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        sections.push(Man::render_options_section);
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        sections.push(Man::render_subcommands_section);
    }
    if cmd.get_after_long_help().is_some() || cmd.get_after_help().is_some() {
        sections.push(Man::render_extra_section);
    }
    // Each rendering starts with the same preamble (it defines the apostrophe); the page
    // has it once.
    let preamble = Roff::default().render();
    let mut page = preamble.clone();
    let mut add = |text: String| {
        page.push_str(text.strip_prefix(preamble.as_str()).unwrap_or(&text));
    };
    for section in sections {
        let mut text = Vec::new();
        section(man, &mut text).expect("writing into a Vec cannot fail");
        add(String::from_utf8(text).expect("clap_mangen writes UTF-8 from UTF-8 help"));
    }
    let mut roff = Roff::default();
    roff.control("SH", ["EXIT STATUS"]);
    // Every page: the status and what it means (app/CLI.md says the same).
    for (status, meaning) in crate::exit::TABLE {
        roff.control("TP", []);
        roff.text([bold(status.to_string())]);
        roff.text([roman(meaning)]);
    }
    if top {
        for (heading, entries) in [("ENVIRONMENT", &ENVIRONMENT[..]), ("FILES", &FILES[..])] {
            roff.control("SH", [heading]);
            for (name, meaning) in entries {
                roff.control("TP", []);
                roff.text([bold(*name)]);
                roff.text([roman(*meaning)]);
            }
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    let see_also = if top {
        "virsh(1), qemu-img(1)"
    } else {
        "rewind(1)"
    };
    roff.text([roman(see_also)]);
    add(roff.render());
    literals_in_bold(&page)
}

/// The help texts mark literal words (commands, paths, values) with backticks, as Markdown
/// does; a man page sets them in bold instead (`man-pages(7)`). Control lines, and a line
/// with an odd number of backticks, are left as they are.
fn literals_in_bold(page: &str) -> String {
    page.lines()
        .map(|line| {
            if line.starts_with('.') || line.matches('`').count() % 2 == 1 {
                return line.to_owned();
            }
            let mut out = String::with_capacity(line.len());
            for (i, part) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    out.push_str("\\fB");
                    out.push_str(part);
                    out.push_str("\\fR");
                } else {
                    out.push_str(part);
                }
            }
            out
        })
        .map(|line| line + "\n")
        .collect()
}

/// ENVIRONMENT of `rewind(1)`.
const ENVIRONMENT: [(&str, &str); 8] = [
    (
        "LIBVIRT_DEFAULT_URI",
        "The libvirt connection when --connect is not given (default qemu:///system).",
    ),
    (
        "REWIND_SOCKET",
        "The protection service's socket (default /run/rewind/rewind.sock).",
    ),
    (
        "REWIND_PASSPHRASE",
        "The passphrase of an encrypted store, instead of asking for it on the terminal; \
         given to the service for a store it adds.",
    ),
    (
        "REWIND_SSH_CONFIG",
        "An ssh_config file to use instead of ~/.ssh/config for stores on other hosts.",
    ),
    (
        "REWIND_CONFIG_DIR",
        "The configuration folder, instead of /etc/rewind (root) or ~/.config/rewind.",
    ),
    (
        "REWIND_STATE_DIR",
        "The folder of history, status and log, instead of /var/lib/rewind (root) or \
         ~/.local/state/rewind.",
    ),
    (
        "REWIND_LOG",
        "How much goes into the log: info by default; debug says more (tracing's filter \
         syntax, e.g. rewind_core::restore=debug,info).",
    ),
    (
        "REWIND_FULL_STATE_WAY",
        "save: take full-state checkpoints through libvirt's managed save (the VM stops \
         for seconds) instead of a live snapshot.",
    ),
];

/// FILES of `rewind(1)`.
const FILES: [(&str, &str); 6] = [
    (
        "/etc/rewind/config.ron",
        "The protection service's configuration: what is protected where, how often and \
         for how long; its store passphrases are beside it (root only).",
    ),
    (
        "/var/lib/rewind/",
        "The service's history, status and log (rewind.log), and its work folder.",
    ),
    (
        "/run/rewind/rewind.sock",
        "The service's socket: the window, the tray and rewind of users in the libvirt \
         group connect to it.",
    ),
    (
        "~/.config/rewind/config.ron, ~/.local/state/rewind/",
        "A user's own configuration and state, used when no service runs.",
    ),
    (
        "/etc/xdg/autostart/rewind-tray.desktop",
        "Starts rewind tray at login; a copy with Hidden=true in ~/.config/autostart/ turns \
         it off for one user.",
    ),
    (
        "/usr/share/doc/rewind/CLI.md",
        "The command line in full, with the JSON formats of --json.",
    ),
];

/// The completion scripts of [`SHELLS`], named as each shell's generator names them.
fn completions(cli: &clap::Command) -> Vec<File> {
    let mut cli = without_hidden_commands(cli);
    SHELLS
        .into_iter()
        .map(|shell| {
            let mut contents = Vec::new();
            clap_complete::generate(shell, &mut cli, BIN, &mut contents);
            File {
                name: clap_complete::Generator::file_name(&shell, BIN),
                what: format!("the {shell} completion"),
                contents,
            }
        })
        .collect()
}

/// `cli` without its hidden commands, which `clap_complete`'s scripts would offer too.
fn without_hidden_commands(cli: &clap::Command) -> clap::Command {
    clap::Command::new(BIN)
        .version(env!("CARGO_PKG_VERSION"))
        .about(cli.get_about().cloned().unwrap_or_default())
        .args(cli.get_arguments().cloned())
        .groups(cli.get_groups().cloned())
        .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn literals_in_backticks_are_set_in_bold_but_not_in_control_lines() {
        let page = ".TP\nrun `rewind vms` or `virsh list`\n.B `kept`\nan odd ` stays\n";
        assert_eq!(
            literals_in_bold(page),
            ".TP\nrun \\fBrewind vms\\fR or \\fBvirsh list\\fR\n.B `kept`\nan odd ` stays\n"
        );
    }

    /// `rewind-vms.1` and so on: what a page per visible command, nested ones too, is named.
    fn expected_pages(cmd: &clap::Command, prefix: &str, names: &mut Vec<String>) {
        names.push(format!("{prefix}.1"));
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            expected_pages(sub, &format!("{prefix}-{}", sub.get_name()), names);
        }
    }

    #[test]
    fn a_man_page_for_rewind_and_each_visible_command() {
        let pages = man_pages(crate::cli::Args::command());
        let mut written: Vec<String> = pages.iter().map(|p| p.name.clone()).collect();
        let mut expected = Vec::new();
        expected_pages(&crate::cli::Args::command(), BIN, &mut expected);
        written.sort();
        expected.sort();
        assert_eq!(written, expected);
        assert!(written.contains(&"rewind-vms.1".to_owned()), "{written:?}");
        assert!(
            !written
                .iter()
                .any(|n| n.contains("generate") || n.contains("help")),
            "{written:?}"
        );
    }

    #[test]
    fn rewind_1_describes_lists_commands_and_exit_status() {
        let pages = man_pages(crate::cli::Args::command());
        let top = String::from_utf8(pages[0].contents.clone()).unwrap();
        let preamble = Roff::default().render();
        assert!(
            top.strip_prefix(preamble.as_str())
                .is_some_and(|rest| rest.starts_with(".TH REWIND 1")),
            "{top}"
        );
        assert_eq!(top.matches(preamble.as_str()).count(), 1, "{top}");
        for section in ["DESCRIPTION", "COMMANDS", "\"EXIT STATUS\"", "\"SEE ALSO\""] {
            assert!(
                top.contains(&format!("\n.SH {section}\n")),
                "{section}: {top}"
            );
        }
        assert!(top.contains("rewind\\-restore(1)"), "{top}");
        for (code, _) in crate::exit::TABLE {
            assert!(top.contains(&format!("\\fB{code}\\fR")), "{code}: {top}");
        }
        assert!(top.contains("Needs attention"), "{top}");
    }

    #[test]
    fn completions_for_bash_zsh_and_fish_without_hidden_commands() {
        let files = completions(&crate::cli::Args::command());
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["rewind.bash", "_rewind", "rewind.fish"]);
        for file in &files {
            let text = String::from_utf8_lossy(&file.contents);
            assert!(text.contains("undo-restore"), "{}: {text}", file.name);
            assert!(!text.contains("generate"), "{}: {text}", file.name);
        }
    }

    #[test]
    fn an_unwritable_folder_is_a_clear_error() {
        // No folder can be made under a file.
        let err = write_all(
            Path::new("/dev/null/rewind"),
            completions(&crate::cli::Args::command()),
        )
        .unwrap_err();
        assert!(matches!(err, GenerateError::CreateFolder { .. }), "{err}");
        assert!(err.to_string().contains("--out"), "{err}");
    }
}
