//! flotilla-worker: the data plane, run by every worker agent.
//!
//! Will own (DESIGN §4, §5, §7): the agent (register, heartbeat, assignments, preemption
//! notices from the instance-metadata service), the burn trainer, the collectives (TCP ring on
//! CPUs, NCCL through cudarc on GPUs), checkpoint I/O through object_store, and the
//! batch-inference runner.
//!
//! Must not import coordinator crates: it talks to the control plane only through
//! `flotilla-proto`. Nothing is implemented here yet; the training-engine issue fills it in.
