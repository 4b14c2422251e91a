//! Named points where the process can be made to stop, to reproduce a crash at an exact
//! moment (fault injection). Inert unless `EMAIL_FAILPOINT` names one.
//!
//! A process whose failpoint is reached writes [`MARKER`] followed by the point's name to
//! standard error and then makes no further progress on that path — the handler or the
//! delivery in flight hangs where it is — so that whoever watches for the line can kill
//! the process (SIGKILL) at exactly that moment. What the process wrote before the point
//! is written; nothing after it is.

use std::fmt;
use std::str::FromStr;

/// What a process prints to standard error when it reaches its failpoint, followed by
/// the point's name.
pub const MARKER: &str = "email-service failpoint reached: ";

/// A point in the notification path where a crash is worth reproducing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failpoint {
    /// `before-record`: a notification request was consumed, nothing recorded yet.
    BeforeRecord,
    /// `before-smtp`: the notification is recorded as `sending`; no connection to the SMTP
    /// server yet.
    BeforeSmtp,
    /// `during-smtp`: inside the SMTP transaction, after the server accepted the sender
    /// and the recipient, before the message's data.
    DuringSmtp,
    /// `after-smtp`: the server accepted the message; it is not recorded as `sent` yet.
    AfterSmtp,
}

impl Failpoint {
    /// Every failpoint, in the order a notification passes them.
    pub const ALL: [Self; 4] = [Self::BeforeRecord, Self::BeforeSmtp, Self::DuringSmtp, Self::AfterSmtp];

    /// The point's name (the value of `EMAIL_FAILPOINT`).
    pub fn name(self) -> &'static str {
        match self {
            Self::BeforeRecord => "before-record",
            Self::BeforeSmtp => "before-smtp",
            Self::DuringSmtp => "during-smtp",
            Self::AfterSmtp => "after-smtp",
        }
    }
}

impl fmt::Display for Failpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Failpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.name() == s.trim()).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
            format!("{s:?} is not a failpoint (one of {})", names.join(", "))
        })
    }
}

/// The failpoint armed in this process, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Failpoints {
    armed: Option<Failpoint>,
}

impl Failpoints {
    pub(crate) fn new(armed: Option<Failpoint>) -> Self {
        Self { armed }
    }

    /// Passes `point`; if it is the armed one, announces it and never returns.
    pub(crate) async fn pass(&self, point: Failpoint) {
        if self.armed == Some(point) {
            tracing::warn!(failpoint = %point, "failpoint reached; waiting to be killed");
            eprintln!("{MARKER}{point}");
            std::future::pending::<()>().await;
        }
    }
}
