//! The tensor backend, named once: burn's `Dispatch`, which runs every tensor on its device's
//! backend (flex, pure Rust, on CPUs; CUDA when built with the `cuda` feature), autodiff being
//! a wrapper around a device. One trainer type serves both: the device is chosen at run time.

/// The backend every module and tensor of the trainer and of batch inference uses.
pub type Dispatch = burn::Dispatch;
/// A device of [`Dispatch`]: flex, CUDA, or either wrapped for autodiff.
pub type Device = burn::DispatchDevice;
/// A tensor on [`Dispatch`].
pub type Tensor<const D: usize, K = burn::tensor::Float> = burn::tensor::Tensor<Dispatch, D, K>;
/// The gradients a backward pass returns.
pub type Gradients = <Dispatch as burn::tensor::backend::AutodiffBackend>::Gradients;

/// The CPU device (burn's flex backend).
pub fn cpu() -> Device {
    burn::backend::flex::FlexDevice.into()
}

/// CUDA device `index`. Only after [`crate::gpu::cuda_devices`] found it: burn's constructor
/// panics without a driver.
pub fn gpu(index: usize) -> Result<Device, String> {
    #[cfg(feature = "cuda")]
    {
        Ok(burn::backend::cuda::CudaDevice::new(index).into())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(format!("GPU {index}: this flotilla was built without the `cuda` feature"))
    }
}

/// `device`, recording operations for a backward pass.
pub fn autodiff(device: Device) -> Device {
    Device::autodiff(device)
}
