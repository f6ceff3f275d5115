//! What crosses the service's socket: one JSON object per line, each way.
//!
//! A client opens the socket and says [`ToService::Hello`]. The service answers
//! [`FromService::Welcome`] (then the state as it is now, as events) or
//! [`FromService::Refused`] (then closes). After that the client sends engine
//! [`Command`]s and receives engine [`Event`]s, the same ones a window that hosts its own
//! engine sees. Errors cross as [`rewind_core::job_error::JobError`]: a kind, whether a retry
//! can help, the message, and the words of each cause.
//!
//! The protocol has a number ([`PROTOCOL`]); the service refuses a client that speaks
//! another one, saying which versions differ.

use std::io::{BufRead, Write};

use rewind_core::engine::{Command, Event};
use rewind_core::job_error::JobError;
use serde::{Deserialize, Serialize};

/// The protocol's number: raised when a message changes in a way an older peer misreads.
///
/// - 1: the first.
/// - 2: the engine's list of runs from checkpoints (`Event::Runs`, sent to every client as
///   it connects), the jobs of boot-checks and runs, and their outputs (issue 23). A
///   client of protocol 1 could not read the list, so it is refused with both numbers.
pub const PROTOCOL: u32 = 2;

/// The longest line either side accepts (a destination list with thousands of checkpoints
/// fits many times over; a peer that sends more is cut off).
pub const MAX_LINE: usize = 64 << 20;

/// What a client sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one per connection or per click
pub enum ToService {
    /// The first message: who is asking, in what protocol.
    Hello {
        /// [`PROTOCOL`] as the client knows it.
        protocol: u32,
        /// `window`, `tray`, `cli`: for the service's log.
        client: String,
    },
    /// A command for the engine.
    Command(Command),
}

/// What the service sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // events are what the socket is for
pub enum FromService {
    /// The client may go on.
    Welcome {
        /// [`PROTOCOL`] as the service knows it.
        protocol: u32,
        /// The service's version (`rewind --version`).
        version: String,
        /// The libvirt connection it protects through.
        uri: String,
    },
    /// The client may not: why (its kind is `permission_denied` or `invalid`).
    Refused(JobError),
    /// An engine event.
    Event(Event),
}

/// A line that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed mid-line.
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The line is longer than [`MAX_LINE`].
    #[error("a message longer than {} MiB came over the connection", MAX_LINE >> 20)]
    TooLong,
    /// The line is not a message of this protocol.
    #[error(
        "a message could not be understood ({0}): the other side may be another version of Rewind"
    )]
    Malformed(#[from] serde_json::Error),
}

/// Writes one message as one line, and flushes.
///
/// # Errors
/// The socket failed.
pub fn write<T: Serialize>(out: &mut impl Write, message: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Reads the next message; `Ok(None)` at a clean end of the connection.
///
/// # Errors
/// The socket failed, the line is too long, or it is not a message.
pub fn read<T: for<'de> Deserialize<'de>>(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
) -> Result<Option<T>, FrameError> {
    line.clear();
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > MAX_LINE + 1 {
            return Err(FrameError::TooLong);
        }
        line.extend_from_slice(&available[..take]);
        input.consume(take);
        if done {
            return Ok(Some(serde_json::from_slice(line)?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_core::job_error::ErrorKind;

    #[test]
    fn a_job_error_crosses_with_its_kind_retry_and_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = JobError {
            kind: ErrorKind::Unavailable,
            retryable: true,
            message: "the drive is not plugged in".into(),
            source: Some(std::sync::Arc::new(io)),
        };
        let mut buf = Vec::new();
        write(&mut buf, &FromService::Refused(error.clone())).unwrap();
        let mut line = Vec::new();
        let back: FromService = read(&mut buf.as_slice(), &mut line).unwrap().unwrap();
        let FromService::Refused(back) = back else {
            panic!("{back:?}")
        };
        assert_eq!(back, error);
        let causes: Vec<String> = std::iter::successors(
            back.source
                .as_deref()
                .map(|s| s as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .map(ToString::to_string)
        .collect();
        assert_eq!(causes, ["no such file"]);
    }

    #[test]
    fn lines_end_cleanly_and_garbage_is_an_error_not_a_panic() {
        let mut line = Vec::new();
        let mut empty: &[u8] = b"";
        assert!(matches!(read::<ToService>(&mut empty, &mut line), Ok(None)));
        let mut cut: &[u8] = b"{\"hello\":";
        assert!(matches!(
            read::<ToService>(&mut cut, &mut line),
            Err(FrameError::Io(_))
        ));
        let mut junk: &[u8] = b"\x00\xffnot json\n";
        assert!(matches!(
            read::<ToService>(&mut junk, &mut line),
            Err(FrameError::Malformed(_))
        ));
        let hello = br#"{"hello":{"protocol":1,"client":"cli"}}
{"command":"RefreshVms"}
"#;
        let mut two: &[u8] = hello;
        assert!(matches!(
            read::<ToService>(&mut two, &mut line),
            Ok(Some(ToService::Hello { protocol: 1, .. }))
        ));
        assert!(matches!(
            read::<ToService>(&mut two, &mut line),
            Ok(Some(ToService::Command(Command::RefreshVms)))
        ));
    }
}
