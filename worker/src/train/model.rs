//! The architectures a job can name (`model.kind`), as burn modules.
//!
//! Owns: building a [`Network`] from a [`ModelSpec`] and the data's shape, and its forward pass.
//! Must not touch: parameter values (every layer is created zero-filled; [`super::flat`] writes
//! the seeded initial values and every update), optimizers, data loading.
//!
//! - `mlp`: `Linear -> ReLU` per entry of `hidden`, then a `Linear` to the classes.
//! - `cnn`: per entry of `channels`, a 3x3 convolution (padding 1) -> ReLU -> 2x2 max-pool
//!   (floor), then a `Linear` from the flattened maps to the classes. Inputs are square
//!   single-channel images: `side = sqrt(features_per_row)` (28 for MNIST, 8 for the digits).

use burn::module::{Initializer, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use flotilla_proto::spec::{MODEL_PARAMETERS_MAX, ModelSpec};

use super::TrainError;
use super::backend::{Device, Dispatch, Tensor};

/// The convolution kernel side, the padding that keeps the image size, and the pooling window.
const CONV_KERNEL: usize = 3;
const CONV_PADDING: usize = 1;
const POOL_WINDOW: usize = 2;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    hidden: Vec<Linear<B>>,
    output: Linear<B>,
}

#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    blocks: Vec<Conv2d<B>>,
    pool: MaxPool2d,
    output: Linear<B>,
    /// Side of the square input image, in pixels.
    side: usize,
}

/// A model of one of the supported kinds. Parameters are visited in declaration order (layer by
/// layer, weight before bias), which is the order of the flat buffers.
#[derive(Module, Debug)]
pub enum Net<B: Backend> {
    Mlp(Mlp<B>),
    Cnn(Cnn<B>),
}

/// The network on the trainer's backend.
pub type Network = Net<Dispatch>;

fn linear(d_input: usize, d_output: usize, device: &Device) -> Linear<Dispatch> {
    LinearConfig::new(d_input, d_output).with_initializer(Initializer::Zeros).init(device)
}

/// The parameters of `spec`'s network for `features` inputs and `classes` outputs: what
/// [`Network::new`] allocates, counted before it does (pure; saturating, for any input).
pub fn parameters(spec: &ModelSpec, features: usize, classes: usize) -> u64 {
    let (features, classes) = (features as u64, classes as u64);
    let dense = |inputs: u64, outputs: u64| inputs.saturating_mul(outputs).saturating_add(outputs);
    match spec {
        ModelSpec::Mlp { hidden } => {
            let widths: Vec<u64> = std::iter::once(features)
                .chain(hidden.iter().map(|&units| u64::from(units)))
                .chain([classes])
                .collect();
            widths.windows(2).map(|pair| dense(pair[0], pair[1])).fold(0, u64::saturating_add)
        }
        ModelSpec::Cnn { channels } => {
            let (mut inputs, mut side, mut total) = (1u64, features.isqrt(), 0u64);
            let window = (CONV_KERNEL * CONV_KERNEL) as u64;
            for &outputs in channels {
                let outputs = u64::from(outputs);
                side /= POOL_WINDOW as u64;
                total = total.saturating_add(dense(inputs.saturating_mul(window), outputs));
                inputs = outputs;
            }
            total.saturating_add(dense(inputs.saturating_mul(side * side), classes))
        }
    }
}

/// `bytes` in GiB (for messages).
pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

impl Network {
    /// Builds the network for `features` inputs and `classes` outputs on `device`.
    pub fn new(spec: &ModelSpec, features: usize, classes: usize, device: &Device) -> Result<Network, TrainError> {
        if features == 0 || classes < 2 {
            return Err(TrainError::Shape(format!(
                "the data has {features} features and {classes} classes; a classifier needs at least 1 and 2"
            )));
        }
        let count = parameters(spec, features, classes);
        if count > MODEL_PARAMETERS_MAX {
            let (field, kind) = match spec {
                ModelSpec::Mlp { .. } => ("model.hidden", "narrower or fewer layers"),
                ModelSpec::Cnn { .. } => ("model.channels", "fewer channels, or smaller images"),
            };
            return Err(TrainError::Shape(format!(
                "{field}: with this data's {features} features and {classes} classes the model has {count} \
                 parameters ({:.1} GiB of weights); at most {MODEL_PARAMETERS_MAX}: use {kind}",
                gib(count.saturating_mul(std::mem::size_of::<f32>() as u64))
            )));
        }
        match spec {
            ModelSpec::Mlp { hidden } => {
                let mut width = features;
                let mut layers = Vec::with_capacity(hidden.len());
                for &units in hidden {
                    layers.push(linear(width, units as usize, device));
                    width = units as usize;
                }
                Ok(Network::Mlp(Mlp { hidden: layers, output: linear(width, classes, device) }))
            }
            ModelSpec::Cnn { channels } => Self::cnn(channels, features, classes, device),
        }
    }

    fn cnn(channels: &[u32], features: usize, classes: usize, device: &Device) -> Result<Network, TrainError> {
        let side = features.isqrt();
        if side * side != features {
            return Err(TrainError::Shape(format!(
                "model.kind = \"cnn\" needs square single-channel images, but rows have {features} features \
                 (not a square number); use model.kind = \"mlp\""
            )));
        }
        let mut blocks = Vec::with_capacity(channels.len());
        let (mut in_channels, mut map_side) = (1usize, side);
        for (index, &out_channels) in channels.iter().enumerate() {
            map_side /= POOL_WINDOW;
            if map_side == 0 {
                return Err(TrainError::Shape(format!(
                    "model.channels has {} blocks, but a {side}x{side} image is pooled to nothing after {index}; \
                     use fewer blocks",
                    channels.len()
                )));
            }
            let conv = Conv2dConfig::new([in_channels, out_channels as usize], [CONV_KERNEL, CONV_KERNEL])
                .with_padding(PaddingConfig2d::Explicit(CONV_PADDING, CONV_PADDING, CONV_PADDING, CONV_PADDING))
                .with_initializer(Initializer::Zeros)
                .init(device);
            blocks.push(conv);
            in_channels = out_channels as usize;
        }
        let pool = MaxPool2dConfig::new([POOL_WINDOW, POOL_WINDOW]).init();
        let flat = in_channels * map_side * map_side;
        Ok(Network::Cnn(Cnn { blocks, pool, output: linear(flat, classes, device), side }))
    }

    /// Logits `[batch, classes]` for `input` `[batch, features]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        match self {
            Network::Mlp(mlp) => {
                let x = mlp.hidden.iter().fold(input, |x, layer| relu(layer.forward(x)));
                mlp.output.forward(x)
            }
            Network::Cnn(cnn) => {
                let [batch, _] = input.dims();
                let image = input.reshape([batch, 1, cnn.side, cnn.side]);
                let maps = cnn.blocks.iter().fold(image, |x, conv| cnn.pool.forward(relu(conv.forward(x))));
                cnn.output.forward(maps.flatten(1, 3))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::backend;
    use crate::train::flat::ParamLayout;

    #[test]
    fn the_parameter_count_is_what_the_network_allocates() {
        let device = backend::cpu();
        for (spec, features, classes) in [
            (ModelSpec::Mlp { hidden: vec![] }, 2, 2),
            (ModelSpec::Mlp { hidden: vec![16, 8] }, 64, 10),
            (ModelSpec::Cnn { channels: vec![4, 8] }, 64, 10),
            (ModelSpec::Cnn { channels: vec![3] }, 81, 3),
        ] {
            let network = Network::new(&spec, features, classes, &device).expect("network");
            assert_eq!(parameters(&spec, features, classes), ParamLayout::of(&network).len as u64, "{spec:?}");
        }
    }

    #[test]
    fn a_model_over_the_parameter_limit_is_refused_before_it_is_allocated() {
        // 784 x 65536 + 2 x 65536^2 + ... = 8.6 G parameters (34 GiB): this aborted in an
        // allocation; now a clear error, at once.
        let spec = ModelSpec::Mlp { hidden: vec![65_536, 65_536, 65_536] };
        let error = Network::new(&spec, 784, 10, &backend::cpu()).expect_err("refused").to_string();
        assert!(error.contains("model.hidden") && error.contains("8642166794 parameters"), "{error}");
        assert!(error.contains("(32.2 GiB of weights); at most 1073741824"), "{error}");
        let spec = ModelSpec::Mlp { hidden: vec![u32::MAX; 16] };
        assert!(parameters(&spec, usize::MAX, usize::MAX) == u64::MAX, "saturates");
    }
}
