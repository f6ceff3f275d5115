//! What the command line tells scripts when it ends: its exit code, and with `--json` the
//! error as JSON on stdout.
//!
//! The code comes from the kind of the error ([`ErrorKind`]), found by walking the error's
//! chain to the first of the core's typed errors (or a [`rewind_core::job_error::JobError`],
//! which is how errors come back from the protection service). Messages are never read.

use std::io::Write;

use rewind_core::job_error::ErrorKind;
use rewind_core::store::StoreError;

/// Everything went as asked.
pub const SUCCESS: u8 = 0;
/// Any other failure.
pub const FAILURE: u8 = 1;
/// Wrong arguments (clap's own code).
pub const USAGE: u8 = 2;
/// The VM, checkpoint, store or destination named does not exist.
pub const NOT_FOUND: u8 = 3;
/// Another process holds what the command needs (a store's lock, the scheduler's, the
/// service's queue).
pub const BUSY: u8 = 4;
/// `rewind status`: a protected VM needs the user's attention.
pub const NEEDS_ATTENTION: u8 = 5;

/// The exit codes and what each means: the man pages' EXIT STATUS and CLI.md say the same.
pub const TABLE: [(u8, &str); 6] = [
    (SUCCESS, "Success."),
    (
        FAILURE,
        "Failure: one line starting with `error:` on standard error says what went wrong \
         and what to do (with --json, the error is also on standard output).",
    ),
    (USAGE, "Wrong arguments: the usage error says which."),
    (
        NOT_FOUND,
        "Not found: the VM, checkpoint, store or destination named does not exist.",
    ),
    (
        BUSY,
        "Busy: another process holds what the command needs (this user's scheduler, the \
         protection service's queue, with --no-wait a store another Rewind process \
         holds); try again when it has finished.",
    ),
    (
        NEEDS_ATTENTION,
        "Needs attention (rewind status): a protected VM's checkpoints are overdue, its last \
         checkpoint failed, or its destination's drive is missing. The output is the same \
         as with 0.",
    ),
];

/// `rewind status` found something the user should look at. Its output is already
/// written: this only sets the exit code.
#[derive(Debug, thiserror::Error)]
#[error("needs attention: {why}")]
pub struct NeedsAttention {
    /// What needs attention.
    pub why: String,
}

/// A failure of kind "not found" (exit code 3) with `message`: for what the command line
/// itself looks up (a VM's checkpoints in a store, a protected VM).
pub fn not_found(message: impl Into<String>) -> anyhow::Error {
    rewind_core::job_error::JobError::new(ErrorKind::NotFound, message).into()
}

/// How a failed command ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// The kind, as `--json` names it: an [`ErrorKind`] in snake case.
    pub kind: String,
}

/// The kind of `error`: of the first typed error in its chain, outermost first.
///
/// A store that is not where the command line said (no folder there, or a folder without
/// a store) is `not_found`; a configured destination whose drive is away stays
/// `unavailable` (it comes as a [`rewind_core::job_error::JobError`] or an `OpenError`
/// first).
fn kind_of(error: &anyhow::Error) -> Option<ErrorKind> {
    error.chain().find_map(|cause| match cause.downcast_ref() {
        Some(StoreError::Missing { .. } | StoreError::NotAStore { .. }) => {
            Some(ErrorKind::NotFound)
        }
        _ => ErrorKind::of(cause),
    })
}

/// The exit code and JSON kind of a failed command.
#[must_use]
pub fn classify(error: &anyhow::Error) -> Failure {
    if error
        .chain()
        .any(<dyn std::error::Error>::is::<NeedsAttention>)
    {
        return Failure {
            code: NEEDS_ATTENTION,
            kind: "needs_attention".into(),
        };
    }
    let kind = kind_of(error).unwrap_or(ErrorKind::Failed);
    let code = match kind {
        ErrorKind::NotFound | ErrorKind::NotConfigured => NOT_FOUND,
        ErrorKind::Busy => BUSY,
        _ => FAILURE,
    };
    Failure {
        code,
        kind: snake_case(kind),
    }
}

fn snake_case(kind: ErrorKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "failed".into(),
    }
}

/// `{"error": {"kind", "message"}}`, as `--json` prints an error.
#[must_use]
pub fn error_json(kind: &str, message: &str) -> String {
    serde_json::json!({ "error": { "kind": kind, "message": message } }).to_string()
}

/// Ends a command that failed with `error`: the `error:` line on stderr, with `json` the
/// error object on stdout too (unless the command already printed its JSON there, as a
/// verify that found damage does), and the exit code.
pub fn fail(error: &anyhow::Error, json: bool, stdout_used: bool) -> u8 {
    let failure = classify(error);
    if failure.code == NEEDS_ATTENTION {
        return failure.code;
    }
    let message = crate::error_text::one_line(error);
    eprintln!("error: {message}");
    if json && !stdout_used {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{}", error_json(&failure.kind, &message)).is_err() {
            // Nowhere left to say it: the exit code still does.
        }
    }
    failure.code
}

/// Ends a command line clap refused (or a help or version it printed): with `--json`
/// among the arguments, a usage error is also a JSON error (`kind` `usage`) on stdout.
pub fn usage(error: &clap::Error) -> u8 {
    use clap::error::ErrorKind as Clap;
    let code = u8::try_from(error.exit_code()).unwrap_or(USAGE);
    let shown = matches!(
        error.kind(),
        Clap::DisplayHelp | Clap::DisplayVersion | Clap::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    if error.print().is_err() {
        // stderr is gone: the exit code still says it.
    }
    if json && !shown {
        let text = error.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        println!("{}", error_json("usage", message));
    }
    code
}

/// stdout, remembering whether anything was written to it.
pub struct Watched<W: Write> {
    inner: W,
    used: bool,
}

impl<W: Write> Watched<W> {
    /// Watches `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, used: false }
    }

    /// Whether anything was written.
    pub fn used(&self) -> bool {
        self.used
    }
}

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.used |= !buf.is_empty();
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_core::job_error::JobError;
    use std::path::PathBuf;

    fn code_and_kind(error: &anyhow::Error) -> (u8, String) {
        let f = classify(error);
        (f.code, f.kind)
    }

    #[test]
    fn the_first_typed_error_in_the_chain_decides() {
        let gone = anyhow::Error::new(rewind_core::Error::VmNotFound {
            wanted: "win11".into(),
            uri: "qemu:///system".into(),
        })
        .context("could not take the checkpoint");
        assert_eq!(code_and_kind(&gone), (NOT_FOUND, "not_found".into()));

        let busy = anyhow::Error::new(StoreError::Busy {
            path: PathBuf::from("/media/usb/rewind"),
            holder: "rewind gc".into(),
        });
        assert_eq!(code_and_kind(&busy), (BUSY, "busy".into()));

        // As errors come back from the service: a JobError with only words under it.
        let remote: JobError =
            serde_json::from_value(serde_json::json!({"kind": "not_found", "retryable": false,
                "message": "no checkpoint x", "causes": ["no checkpoint x"]}))
            .unwrap();
        let remote = anyhow::Error::new(remote).context("the protection service said");
        assert_eq!(code_and_kind(&remote), (NOT_FOUND, "not_found".into()));

        let not_configured = anyhow::Error::new(JobError::new(
            ErrorKind::NotConfigured,
            "there is no destination called \"usb\"",
        ));
        assert_eq!(code_and_kind(&not_configured).0, NOT_FOUND);

        let denied = anyhow::Error::new(StoreError::WrongPassphrase {
            path: PathBuf::from("/s"),
        });
        assert_eq!(
            code_and_kind(&denied),
            (FAILURE, "permission_denied".into())
        );
    }

    #[test]
    fn a_store_not_where_the_command_line_said_is_not_found() {
        let missing = anyhow::Error::new(StoreError::Missing {
            path: PathBuf::from("/media/usb/rewind"),
        });
        assert_eq!(code_and_kind(&missing), (NOT_FOUND, "not_found".into()));
        // A configured destination whose drive is away is unavailable, not unknown.
        let away = anyhow::Error::new(JobError::from(StoreError::Missing {
            path: PathBuf::from("/media/usb/rewind"),
        }));
        assert_eq!(code_and_kind(&away), (FAILURE, "unavailable".into()));
    }

    #[test]
    fn untyped_errors_are_failures_and_attention_is_its_own_code() {
        assert_eq!(
            code_and_kind(&anyhow::anyhow!("something broke")),
            (FAILURE, "failed".into())
        );
        let attention = anyhow::Error::new(NeedsAttention {
            why: "win11 is overdue".into(),
        });
        assert_eq!(classify(&attention).code, NEEDS_ATTENTION);
    }

    #[test]
    fn the_error_object_has_kind_and_message() {
        let v: serde_json::Value =
            serde_json::from_str(&error_json("not_found", "no VM \"x\"")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"kind": "not_found", "message": "no VM \"x\""}})
        );
    }

    #[test]
    fn the_codes_are_distinct_and_all_documented() {
        let mut codes: Vec<u8> = TABLE.iter().map(|(c, _)| *c).collect();
        codes.dedup();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5]);
        let doc = include_str!("../CLI.md");
        for (code, _) in TABLE {
            assert!(
                doc.contains(&format!("| {code} |")),
                "CLI.md's table lacks exit code {code}"
            );
        }
    }
}
