//! The GPUs this worker can train on, probed before anything touches CUDA: cudarc's and burn's
//! CUDA constructors panic where the driver is missing, so nothing calls them until
//! [`cuda_devices`] said yes. Without the `cuda` feature every probe answers with how to get a
//! build that has it.

/// How many CUDA devices this worker can use, or why none (the message names the fix).
pub fn cuda_devices() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this flotilla was built without GPU support (cargo feature `cuda`): build it with \
             `cargo build --release --features cuda`, or set workers.gpus = 0 to train on CPUs"
            .into())
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // the library probes are `unsafe fn` in cudarc
fn probe() -> Result<usize, String> {
    // SAFETY: the probes only try to dlopen the libraries and report whether that worked.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) on this machine: run the job on a GPU instance, or set \
                    workers.gpus = 0 to train on CPUs"
            .into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("the CUDA driver is here but NVRTC (libnvrtc.so, which compiles burn's CUDA kernels) is \
                    not: install the CUDA runtime libraries, or set workers.gpus = 0"
            .into());
    }
    cudarc::driver::result::init().map_err(|e| format!("the CUDA driver did not start: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("the CUDA driver cannot count its devices: {e:?}"))?;
    match usize::try_from(count) {
        Ok(0) | Err(_) => Err("the CUDA driver sees no GPU on this machine: check `nvidia-smi`, or set \
                               workers.gpus = 0"
            .into()),
        Ok(count) => Ok(count),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_machine_without_gpus_gets_an_answer_that_names_the_fix() {
        // This machine (and CI) has no GPU: whichever the build, the probe answers without
        // panicking and says what to do.
        let Err(why) = super::cuda_devices() else { return }; // a GPU machine: nothing to check
        assert!(why.contains("workers.gpus = 0") || why.contains("--features cuda"), "{why}");
    }
}
