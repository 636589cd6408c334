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
use flotilla_proto::spec::ModelSpec;

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

impl Network {
    /// Builds the network for `features` inputs and `classes` outputs on `device`.
    pub fn new(spec: &ModelSpec, features: usize, classes: usize, device: &Device) -> Result<Network, TrainError> {
        if features == 0 || classes < 2 {
            return Err(TrainError::Shape(format!(
                "the data has {features} features and {classes} classes; a classifier needs at least 1 and 2"
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
