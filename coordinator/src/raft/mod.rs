//! Raft: the durable log (`storage`), one node's replica logic (`replica`, shared by the real
//! node and the deterministic simulation) and the async driver (`node`).

pub mod chunks;
pub mod legacy;
pub mod node;
pub mod replica;
pub mod storage;
pub mod transport;
