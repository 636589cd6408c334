//! Identifiers shared by the coordinator, the workers and the CLI.
//!
//! They are defined here, in the pure core, because the replicated state machine keys its maps
//! by them; `flotilla-proto` re-exports them and owns their wire form (strings such as
//! `job-42`). Each id has one textual form for output and accepts a few forms on input
//! (`job-42`, `42`), so users can paste what the CLI printed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An id string did not parse. Names what was expected so the caller can show it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a {kind} id; expected `{prefix}-N` or `N` with N a whole number")]
pub struct IdParseError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub input: String,
}

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The prefix of the textual form, e.g. `job` in `job-42`.
            pub const PREFIX: &'static str = $prefix;
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}-{}", $prefix, self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(input: &str) -> Result<Self, Self::Err> {
                let trimmed = input.trim();
                let digits = trimmed
                    .strip_prefix(concat!($prefix, "-"))
                    .unwrap_or(trimmed);
                let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
                match digits.parse::<u64>() {
                    Ok(n) if all_digits => Ok($name(n)),
                    _ => Err(IdParseError { kind: $kind, prefix: $prefix, input: input.to_string() }),
                }
            }
        }
    };
}

numeric_id!(
    /// A training or inference job. Assigned by the state machine from a counter, so ids are
    /// dense, increasing and identical on every replica.
    JobId,
    "job",
    "job"
);
numeric_id!(
    /// A registered worker agent. A worker that re-registers after a restart gets a new id, so
    /// a stale heartbeat can never be mistaken for a live one.
    WorkerId,
    "worker",
    "worker"
);
numeric_id!(
    /// A coordinator (Raft) node, as configured with `--id N`. Never 0: raft-rs reserves 0.
    NodeId,
    "node",
    "node"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        for n in [0u64, 1, 42, u64::MAX] {
            assert_eq!(JobId(n).to_string().parse::<JobId>(), Ok(JobId(n)));
            assert_eq!(WorkerId(n).to_string().parse::<WorkerId>(), Ok(WorkerId(n)));
            assert_eq!(NodeId(n).to_string().parse::<NodeId>(), Ok(NodeId(n)));
        }
        assert_eq!("7".parse::<JobId>(), Ok(JobId(7)));
        assert_eq!(" job-7 ".parse::<JobId>(), Ok(JobId(7)));
    }

    #[test]
    fn bad_ids_are_rejected_with_the_expected_form() {
        for bad in ["", "job-", "job--1", "worker-3", "job-1x", "+5", "job-+5", "18446744073709551616"] {
            let err = bad.parse::<JobId>().expect_err(bad);
            assert!(err.to_string().contains("job-N"), "{err}");
        }
    }
}
