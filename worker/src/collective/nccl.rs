//! NCCL through cudarc: the GPU backend of [`Communicator`] (feature `cuda`).
//!
//! cudarc loads libcuda and libnccl at run time (`dynamic-loading`), so this compiles on any
//! machine; where the libraries are missing, [`NcclCommunicator::new`] returns
//! [`CollectiveError::Unavailable`] instead of letting cudarc panic (its constructors panic when
//! a library is absent, hence the probe first).
//!
//! The unique id that ties the ranks together is made once ([`new_unique_id`], on any machine
//! with NCCL) and handed to every rank from outside (the coordinator's rendezvous).
//!
//! The trait works on host buffers: each call copies to the device, runs the NCCL collective
//! on the rank's stream, and copies back. NCCL operations cannot be interrupted here, so the
//! timeout of the TCP ring does not apply; a lost peer is detected by the coordinator's lease.

#![allow(unsafe_code)] // the library probes are `unsafe fn` in cudarc

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{CollectiveError, Communicator};

/// Bytes in an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Checks that the CUDA driver and NCCL libraries can be loaded.
pub fn probe() -> Result<(), CollectiveError> {
    // SAFETY: the probes only try to dlopen the libraries and report whether that worked.
    let cuda = unsafe { cudarc::driver::sys::is_culib_present() };
    if !cuda {
        return Err(CollectiveError::Unavailable(
            "no CUDA driver (libcuda.so) on this machine; use a GPU instance or train with gpus = 0".into(),
        ));
    }
    // SAFETY: as above.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !nccl {
        return Err(CollectiveError::Unavailable(
            "CUDA is present but NCCL (libnccl.so.2) is not; install NCCL or train with gpus = 0".into(),
        ));
    }
    Ok(())
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Unavailable(format!("{what}: {e:?}"))
}

/// A fresh NCCL unique id (made by one rank, shared with all through the rendezvous).
pub fn new_unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    probe()?;
    let id = Id::new().map_err(|e| nccl_error("creating an NCCL unique id", e))?;
    Ok(id.internal().map(|c| c as u8))
}

pub struct NcclCommunicator {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl NcclCommunicator {
    /// Joins the NCCL clique `unique_id` as `rank` of `world` on GPU `device`.
    pub fn new(
        device: usize,
        rank: usize,
        world: usize,
        unique_id: &[u8],
    ) -> Result<NcclCommunicator, CollectiveError> {
        probe()?;
        let bytes: [u8; UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
            CollectiveError::Invalid(format!("an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}", unique_id.len()))
        })?;
        let context = CudaContext::new(device).map_err(|e| nccl_error(&format!("opening GPU {device}"), e))?;
        let stream = context.default_stream();
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm =
            Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| nccl_error("joining the NCCL clique", e))?;
        Ok(NcclCommunicator { comm, stream })
    }

    fn round_trip(
        &mut self,
        buffer: &mut [f32],
        what: &str,
        op: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if buffer.is_empty() {
            return Ok(());
        }
        let mut device = self.stream.clone_htod(buffer).map_err(|e| nccl_error(&format!("{what}: copy to GPU"), e))?;
        op(&self.comm, &mut device)?;
        self.stream.memcpy_dtoh(&device, buffer).map_err(|e| nccl_error(&format!("{what}: copy from GPU"), e))?;
        self.stream.synchronize().map_err(|e| nccl_error(&format!("{what}: synchronize"), e))
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap;
// every call here takes `&mut self`, so at most one thread uses it at a time.
unsafe impl Send for NcclCommunicator {}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.round_trip(buffer, "all_reduce", |comm, device| {
            comm.all_reduce_in_place(device, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_error("ncclAllReduce", e))
        })
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size() {
            return Err(CollectiveError::Invalid(format!("broadcast root {root} in a world of {}", self.world_size())));
        }
        let root = i32::try_from(root).map_err(|_| CollectiveError::Invalid("root does not fit NCCL's int".into()))?;
        self.round_trip(buffer, "broadcast", |comm, device| {
            comm.broadcast_in_place(device, root).map(|_| ()).map_err(|e| nccl_error("ncclBroadcast", e))
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [0.0f32];
        self.all_reduce_sum(&mut token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On machines without CUDA (CI), every entry point fails cleanly instead of panicking.
    #[test]
    fn without_cuda_the_backend_reports_unavailable() {
        if probe().is_ok() {
            eprintln!("CUDA and NCCL are present here; the GPU check lives in scripts/gpu_check.sh");
            return;
        }
        assert!(matches!(new_unique_id(), Err(CollectiveError::Unavailable(_))));
        let err = NcclCommunicator::new(0, 0, 1, &[0u8; UNIQUE_ID_BYTES]).err().expect("no CUDA here");
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
