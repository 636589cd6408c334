//! flotilla-core: the pure logic of Flotilla.
//!
//! Owns the job-spec format and its validation, the identifiers every other crate shares, and
//! (in later issues) the replicated state machine, the gang scheduler, the autoscaling policy
//! and the cost model.
//!
//! Must not touch: the network, the disk, the clock, threads or randomness. Time enters as
//! values stamped into commands by the Raft leader, randomness as seeds. This keeps every
//! decision reproducible in the deterministic simulation tests (DESIGN §9).

pub mod autoscale;
pub mod ids;
pub mod market;
pub mod rand;
pub mod scheduler;
pub mod spec;
pub mod state;
pub mod text;

pub use ids::{IdParseError, JobId, NodeId, WorkerId};
pub use spec::{JobSpec, SpecError};
