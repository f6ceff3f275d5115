//! An error as one line for the user: what failed, then why, each cause once.
//!
//! Many errors already say their cause in their own words ("could not read X: permission
//! denied") and also hand it on as their `source`, so printing the whole chain with
//! `{:#}` says the cause twice. [`one_line`] leaves out a cause whose words the line holds
//! already.

/// `what failed: why: why`, without repeats.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let words = cause.to_string();
        if words.is_empty() || line.contains(&words) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&words);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says its cause and also hands it on, as many do.
    #[derive(Debug)]
    struct Open {
        source: std::io::Error,
    }

    impl std::fmt::Display for Open {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "could not open the store: {}", self.source)
        }
    }

    impl std::error::Error for Open {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = io.to_string();
        let e = anyhow::Error::new(Open { source: io }).context("rewind status");
        assert_eq!(
            one_line(&e),
            format!("rewind status: could not open the store: {said}")
        );
        assert_eq!(
            format!("{e:#}").matches(&said).count(),
            2,
            "anyhow says it twice"
        );
    }

    #[test]
    fn causes_not_yet_said_are_kept() {
        let e = anyhow::anyhow!("the folder is missing").context("could not add the destination");
        assert_eq!(
            one_line(&e),
            "could not add the destination: the folder is missing"
        );
    }
}
