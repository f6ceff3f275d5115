//! Start at login: an XDG autostart entry, `$XDG_CONFIG_HOME/autostart/rewind.desktop`
//! (`~/.config/autostart/` by default), that starts Rewind in the tray.
//!
//! The entry follows the Desktop Entry and Desktop Application Autostart specifications:
//! the session starts every entry in that folder unless it says `Hidden=true` (or, on GNOME,
//! `X-GNOME-Autostart-enabled=false`). Turning autostart off deletes the file; Rewind installs
//! no system-wide entry that would need hiding.

use std::fs;
use std::path::{Path, PathBuf};

/// What can go wrong when turning start at login on or off.
#[derive(Debug, thiserror::Error)]
pub enum AutostartError {
    /// Neither `$XDG_CONFIG_HOME` nor `$HOME` says where the folder is.
    #[error(
        "cannot tell where the autostart folder is: neither XDG_CONFIG_HOME nor HOME is set to an absolute path. Set HOME and try again"
    )]
    NoConfigFolder,
    /// The program's path cannot go into a desktop entry.
    #[error("cannot start Rewind at login from {what}; {fix}: {}", path.display())]
    ProgramPath {
        /// What is wrong with it.
        what: &'static str,
        /// What to do.
        fix: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Writing or removing the entry failed.
    #[error("could not {action} ({source}); {fix}: {}", path.display())]
    Io {
        /// What Rewind was doing.
        action: &'static str,
        /// What to do.
        fix: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The argument the entry passes so that Rewind starts in the tray, without a window.
pub const MINIMIZED_FLAG: &str = "--minimized";

/// The entry's file name inside the autostart folder.
const ENTRY_NAME: &str = "rewind.desktop";

/// Whether Rewind starts at login (an enabled entry exists).
#[must_use]
pub fn is_enabled() -> bool {
    config_home().is_some_and(|config| is_enabled_in(&config))
}

/// Turns starting at login on (writing an entry that runs `exe` [`MINIMIZED_FLAG`]) or off
/// (removing the entry).
pub fn set_enabled(enabled: bool, exe: &Path) -> Result<(), AutostartError> {
    let config = config_home().ok_or(AutostartError::NoConfigFolder)?;
    set_enabled_in(&config, enabled, exe)
}

/// The XDG config folder: `$XDG_CONFIG_HOME`, or `$HOME/.config` (see
/// [`crate::paths::user_config_home`]).
fn config_home() -> Option<PathBuf> {
    crate::paths::user_config_home()
}

/// The entry's path under the config folder `config`.
fn entry_path(config: &Path) -> PathBuf {
    config.join("autostart").join(ENTRY_NAME)
}

/// Whether the entry under `config` exists and is not switched off.
fn is_enabled_in(config: &Path) -> bool {
    fs::read_to_string(entry_path(config)).is_ok_and(|text| entry_is_enabled(&text))
}

/// Whether an autostart entry's text leaves it enabled.
fn entry_is_enabled(text: &str) -> bool {
    let mut in_main_group = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_main_group = line == "[Desktop Entry]";
            continue;
        }
        if !in_main_group {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match (key.trim(), value.trim()) {
            ("Hidden", "true") | ("X-GNOME-Autostart-enabled", "false") => return false,
            _ => {}
        }
    }
    true
}

fn set_enabled_in(config: &Path, enabled: bool, exe: &Path) -> Result<(), AutostartError> {
    let path = entry_path(config);
    if enabled {
        let text = entry_text(exe)?;
        let dir = path.parent().unwrap_or(config);
        fs::create_dir_all(dir).map_err(|source| AutostartError::Io {
            action: "create the autostart folder",
            fix: "check that you may write there",
            path: dir.to_path_buf(),
            source,
        })?;
        crate::atomic_file::write(&path, text.as_bytes(), 0o644).map_err(|source| {
            AutostartError::Io {
                action: "write the autostart entry",
                fix: "check that the folder is writable and the disk not full",
                path: path.clone(),
                source,
            }
        })
    } else {
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(AutostartError::Io {
                action: "remove the autostart entry",
                fix: "delete it by hand to stop Rewind starting at login",
                path,
                source,
            }),
        }
    }
}

/// The entry that starts `exe` in the tray.
fn entry_text(exe: &Path) -> Result<String, AutostartError> {
    let refuse = |what, fix| AutostartError::ProgramPath {
        what,
        fix,
        path: exe.to_path_buf(),
    };
    let Some(exe_text) = exe.to_str() else {
        return Err(refuse(
            "a path that is not valid UTF-8 (desktop entries are UTF-8)",
            "move or link the program to a plain path",
        ));
    };
    if !exe.is_absolute() {
        return Err(refuse(
            "a relative path (the session starts it from another folder)",
            "give the program's absolute path",
        ));
    }
    if exe_text.chars().any(char::is_control) {
        return Err(refuse(
            "a path with control characters (such as a line break) in it",
            "move or link the program to a plain path",
        ));
    }
    Ok(format!(
        "# Written by Rewind (\"Start at login\"). Turn that setting off, or delete this file,\n\
         # to stop Rewind starting at login.\n\
         [Desktop Entry]\n\
         Type=Application\n\
         Name=Rewind\n\
         Comment=Protects your virtual machines with checkpoints; starts in the tray\n\
         Exec={} {MINIMIZED_FLAG}\n\
         TryExec={}\n\
         Icon=rewind\n\
         Terminal=false\n\
         X-GNOME-Autostart-enabled=true\n",
        quote_exec_arg(exe_text),
        escape_string(exe_text),
    ))
}

/// Quotes one argument of an `Exec` key (Desktop Entry spec, "The Exec key"): in double
/// quotes, with `"`, `` ` ``, `$` and `\` escaped by a backslash, and `%` doubled (field
/// codes); then the value-level escaping of strings, which doubles every backslash again.
fn quote_exec_arg(arg: &str) -> String {
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('"');
    for c in arg.chars() {
        match c {
            '"' | '`' | '$' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '%' => quoted.push_str("%%"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    escape_string(&quoted)
}

/// The escaping of a `string` value (Desktop Entry spec, "Possible value types"): a
/// backslash is written as `\\`. Leading spaces would be dropped, so the first one is `\s`.
fn escape_string(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\");
    match escaped.strip_prefix(' ') {
        Some(rest) => format!("\\s{rest}"),
        None => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir as ScratchDir;

    /// Undoes [`escape_string`] and [`quote_exec_arg`] the way a desktop reads `Exec`: first
    /// the string escapes, then the quoting. Returns the arguments.
    fn parse_exec(value: &str) -> Vec<String> {
        let mut unescaped = String::new();
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('\\') | None => unescaped.push('\\'),
                    Some('s') => unescaped.push(' '),
                    Some('n') => unescaped.push('\n'),
                    Some('t') => unescaped.push('\t'),
                    Some('r') => unescaped.push('\r'),
                    // Not a string escape: left for the quoting rules.
                    Some(other) => {
                        unescaped.push('\\');
                        unescaped.push(other);
                    }
                }
            } else {
                unescaped.push(c);
            }
        }
        let mut args = Vec::new();
        let mut chars = unescaped.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c == ' ' {
                chars.next();
                continue;
            }
            let mut arg = String::new();
            if c == '"' {
                chars.next();
                loop {
                    match chars.next().expect("unterminated quote") {
                        '"' => break,
                        '\\' => arg.push(chars.next().expect("dangling backslash")),
                        '%' => {
                            assert_eq!(chars.next(), Some('%'), "lone % is a field code");
                            arg.push('%');
                        }
                        other => arg.push(other),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    arg.push(c);
                    chars.next();
                }
            }
            args.push(arg);
        }
        args
    }

    fn key<'a>(text: &'a str, key: &str) -> &'a str {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in\n{text}"))
    }

    #[test]
    fn the_entry_starts_the_program_minimized() {
        let text = entry_text(Path::new("/usr/bin/rewind")).unwrap();
        assert!(text.contains("\n[Desktop Entry]\n"), "{text}");
        assert_eq!(key(&text, "Type"), "Application");
        assert_eq!(key(&text, "Name"), "Rewind");
        assert_eq!(key(&text, "Icon"), "rewind");
        assert!(!key(&text, "Comment").is_empty());
        assert_eq!(key(&text, "Exec"), "\"/usr/bin/rewind\" --minimized");
        assert_eq!(key(&text, "TryExec"), "/usr/bin/rewind");
        assert_eq!(key(&text, "X-GNOME-Autostart-enabled"), "true");
        assert_eq!(
            parse_exec(key(&text, "Exec")),
            ["/usr/bin/rewind", MINIMIZED_FLAG]
        );
        assert!(entry_is_enabled(&text));
    }

    #[test]
    fn awkward_paths_are_quoted_so_they_read_back_the_same() {
        for path in [
            "/opt/My Apps/rewind",
            "/opt/\"quoted\"/rewind",
            "/opt/$HOME/`x`/rewind",
            "/opt/back\\slash/rewind",
            "/opt/100%/rewind %f",
            "/opt/ü ñ/rewind",
        ] {
            let text = entry_text(Path::new(path)).unwrap();
            assert_eq!(
                parse_exec(key(&text, "Exec")),
                [path, MINIMIZED_FLAG],
                "{text}"
            );
        }
        let text = entry_text(Path::new("/opt/back\\slash/rewind")).unwrap();
        assert_eq!(
            key(&text, "Exec"),
            r#""/opt/back\\\\slash/rewind" --minimized"#
        );
        assert_eq!(key(&text, "TryExec"), r"/opt/back\\slash/rewind");
    }

    #[test]
    fn unusable_paths_are_refused_with_the_reason() {
        let e = entry_text(Path::new("rewind")).unwrap_err();
        assert!(e.to_string().contains("relative path"), "{e}");
        let e = entry_text(Path::new("/opt/line\nbreak/rewind")).unwrap_err();
        assert!(e.to_string().contains("control characters"), "{e}");
        let bad =
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/opt/\xff/rewind");
        let e = entry_text(Path::new(bad)).unwrap_err();
        assert!(e.to_string().contains("not valid UTF-8"), "{e}");
    }

    #[test]
    fn hidden_or_gnome_disabled_entries_count_as_off() {
        let entry = "[Desktop Entry]\nType=Application\nExec=rewind\n";
        assert!(entry_is_enabled(entry));
        assert!(!entry_is_enabled(&format!("{entry}Hidden=true\n")));
        assert!(!entry_is_enabled(&format!(
            "{entry}X-GNOME-Autostart-enabled = false\n"
        )));
        assert!(entry_is_enabled(&format!("{entry}Hidden=false\n")));
        // Keys of other groups do not count.
        assert!(entry_is_enabled(&format!(
            "{entry}[Desktop Action x]\nHidden=true\n"
        )));
    }

    #[test]
    fn turning_it_on_and_off_writes_and_removes_the_entry() {
        let dir = ScratchDir::new().unwrap();
        let config = dir.path().join("config");
        let exe = Path::new("/usr/local/bin/rewind");
        assert!(!is_enabled_in(&config));

        set_enabled_in(&config, true, exe).unwrap();
        let path = config.join("autostart/rewind.desktop");
        assert!(is_enabled_in(&config));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, entry_text(exe).unwrap());

        // Again: replaces the entry, leaves no temporary files.
        set_enabled_in(&config, true, Path::new("/opt/rewind/rewind")).unwrap();
        assert!(
            fs::read_to_string(&path)
                .unwrap()
                .contains("/opt/rewind/rewind")
        );
        let names: Vec<_> = fs::read_dir(config.join("autostart"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["rewind.desktop"]);

        set_enabled_in(&config, false, exe).unwrap();
        assert!(!path.exists());
        assert!(!is_enabled_in(&config));
        // Off when already off is fine.
        set_enabled_in(&config, false, exe).unwrap();
    }

    #[test]
    fn an_entry_switched_off_by_the_desktop_reads_as_off() {
        let dir = ScratchDir::new().unwrap();
        let config = dir.path().to_path_buf();
        set_enabled_in(&config, true, Path::new("/usr/bin/rewind")).unwrap();
        let path = entry_path(&config);
        let text = fs::read_to_string(&path).unwrap().replace(
            "X-GNOME-Autostart-enabled=true",
            "X-GNOME-Autostart-enabled=false",
        );
        fs::write(&path, text).unwrap();
        assert!(!is_enabled_in(&config));
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_an_error_naming_it() {
        let dir = ScratchDir::new().unwrap();
        // A file where the config folder should be.
        let config = dir.path().join("config");
        fs::write(&config, "not a folder").unwrap();
        let e = set_enabled_in(&config, true, Path::new("/usr/bin/rewind")).unwrap_err();
        let message = format!("{e:#}");
        assert!(
            message.contains("could not create the autostart folder")
                && message.contains(&config.join("autostart").display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn the_public_functions_use_the_environment() {
        // Reads only: the environment is shared by all tests and must not be changed here.
        let expected = config_home().is_some_and(|c| is_enabled_in(&c));
        assert_eq!(is_enabled(), expected);
        let e = set_enabled(true, Path::new("relative"));
        assert!(
            e.is_err(),
            "a relative path is refused before anything is written"
        );
    }
}
