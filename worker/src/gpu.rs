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

/// Environment variable naming the folder of the compiled-kernel cache (see
/// [`kernel_cache_dir`]).
pub const KERNEL_CACHE_ENV: &str = "FLOTILLA_KERNEL_CACHE";

/// Where burn keeps the CUDA kernels it compiled (PTX, by kernel and GPU architecture), so a
/// later process on this machine (an agent's restart, the next `flotilla train`) skips the
/// compilation: `$FLOTILLA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/flotilla/kernels`, else
/// `~/.cache/flotilla/kernels`, else the temporary folder's `flotilla-kernels`.
pub fn kernel_cache_dir() -> std::path::PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    var(KERNEL_CACHE_ENV)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flotilla").join("kernels")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("flotilla").join("kernels")))
        .unwrap_or_else(|| std::env::temp_dir().join("flotilla-kernels"))
}

/// Points burn's CUDA runtime at [`kernel_cache_dir`], once per process and before its first
/// use (its settings cannot change later). A `cubecl.toml` of the user's that names a cache
/// keeps it.
#[cfg(feature = "cuda")]
fn use_kernel_cache() {
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if CubeClRuntimeConfig::storage().lock().is_some() {
            return; // already in use: its settings stay
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            let dir = kernel_cache_dir();
            if std::fs::create_dir_all(&dir).is_ok() {
                config.compilation.cache = Some(CacheConfig::File(dir));
            }
        }
        let mut slot = CubeClRuntimeConfig::storage().lock();
        if slot.is_none() {
            *slot = Some(std::sync::Arc::new(config));
        }
    });
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
        Ok(count) => {
            use_kernel_cache();
            Ok(count)
        }
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
