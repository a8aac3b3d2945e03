//! A small MLP denoiser backbone for the built-in 2-D toy distributions. It sits behind the same
//! `EdmPrecond`, sampler and losses as the UNets: a point is a [N, 2, 1, 1] "image".

use crate::config::EdmConfig;
use crate::nn::{silu, label_dropout, Init, InitMode, InitSpec, Linear, PositionalEmbedding};
use burn::module::{Flag, Module, Param};
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct ToyMlp {
    pub map_noise: PositionalEmbedding,
    pub map_label: Option<Linear>,
    pub map_layer0: Linear,
    pub map_layer1: Linear,
    pub input: Linear,
    pub layers: Vec<Linear>,
    pub output: Linear,
    pub label_dropout: f64,
    pub training: Param<Flag>,
}

impl ToyMlp {
    pub fn new(cfg: &EdmConfig, init: &mut Init) -> Self {
        let hidden = cfg.hidden_dim();
        let c = cfg.img_channels;
        // PyTorch's default Linear init (EDM's ADM `init`): U(+-1/sqrt(fan_in)) for weights and
        // biases. (Xavier on the 2-wide input layer drowns the point in the noise embedding.)
        let s = (1.0f64 / 3.0).sqrt();
        let w = InitSpec::new(InitMode::KaimingUniform, s, s);
        Self {
            map_noise: PositionalEmbedding { num_channels: hidden, max_positions: 10000, endpoint: true },
            map_label: (cfg.label_dim > 0).then(|| Linear::new(init, cfg.label_dim, hidden, false, w)),
            map_layer0: Linear::new(init, hidden, hidden, true, w),
            map_layer1: Linear::new(init, hidden, hidden, true, w),
            input: Linear::new(init, c, hidden, true, w),
            layers: (1..cfg.num_layers()).map(|_| Linear::new(init, hidden, hidden, true, w)).collect(),
            output: Linear::new(init, hidden, c, true, w),
            label_dropout: cfg.label_dropout,
            training: Param::from_bool(true),
        }
    }

    pub fn forward(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let hidden = self.encode(x, noise_labels, class_labels);
        self.output.forward(hidden).reshape([n, c, h, w])
    }

    /// The last hidden layer [N, hidden]: the "bottleneck" DMD2's GAN head reads.
    pub fn encode(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>) -> Tensor<2> {
        let [n, c, h, w] = x.dims();
        let mut emb = self.map_layer0.forward(self.map_noise.forward(noise_labels));
        if let (Some(map_label), Some(labels)) = (&self.map_label, class_labels) {
            emb = emb + map_label.forward(label_dropout(labels, self.label_dropout, &self.training));
        }
        let emb = self.map_layer1.forward(silu(emb));
        let dtype = x.dtype();
        let mut hdn = silu(self.input.forward(x.reshape([n, c * h * w])) + emb.cast(dtype));
        for layer in &self.layers {
            hdn = silu(layer.forward(hdn));
        }
        hdn
    }
}
