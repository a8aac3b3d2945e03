//! EDM's preconditioning (Karras et al. 2022, Table 1): the denoiser
//! D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with c_noise = ln(sigma) / 4.

use crate::config::{EdmConfig, ModelType};
use crate::dhariwal::DhariwalUNet;
use crate::mlp::ToyMlp;
use crate::nn::Init;
use crate::song::SongUNet;
use burn::module::Module;
use crate::config::ConfigError;
use crate::weights::{load_named, named_tensors, write_atomic, NamedTensors, WeightError};
use burn::tensor::{Device, FloatDType, Tensor};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// `NET.safetensors` -> `NET.json`, where a network's config lives by default.
pub fn config_path_for(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// The network F under the preconditioning; EDM's `model`.
#[derive(Module, Debug)]
pub enum Backbone {
    Dhariwal(DhariwalUNet),
    Song(SongUNet),
    Mlp(ToyMlp),
}

#[derive(Module, Debug)]
pub struct EdmPrecond {
    pub model: Backbone,
    #[module(skip)]
    pub config: EdmConfig,
    /// Run the backbone in bfloat16 (weights stay float32 and are cast at use; the
    /// preconditioning, embeddings, group norms and attention weights stay float32), as DMD2
    /// runs its networks on GPUs. Off by default.
    #[module(skip)]
    pub bf16_body: bool,
}

impl EdmPrecond {
    /// A freshly initialised network (EDM's initialisation), deterministic in `seed`.
    pub fn new(config: &EdmConfig, device: &Device, seed: u64) -> Self {
        Self::build(config, &mut Init::new(device, seed))
    }

    fn build(config: &EdmConfig, init: &mut Init) -> Self {
        let model = match config.model_type {
            ModelType::DhariwalUNet => Backbone::Dhariwal(DhariwalUNet::new(config, init)),
            ModelType::SongUNet => Backbone::Song(SongUNet::new(config, init)),
            ModelType::ToyMLP => Backbone::Mlp(ToyMlp::new(config, init)),
        };
        Self { model, config: config.clone(), bf16_body: false }
    }

    /// The network of `config` with the weights of `tensors` (EDM's `state_dict` names).
    /// `file` names the source in errors; `namespace` seeds the parameter ids (see `weights`).
    pub fn from_named(config: &EdmConfig, tensors: &NamedTensors, file: &str, device: &Device, namespace: &str) -> Result<Self, WeightError> {
        let net = Self::build(config, &mut Init::placeholder(device));
        load_named(net, tensors, file, namespace)
    }

    /// Loads `weights` (safetensors) with its config `config` (JSON of EDM's kwargs).
    pub fn load(weights: &Path, config: &Path, device: &Device, namespace: &str) -> Result<Self, ModelError> {
        let tensors = NamedTensors::read(weights)?;
        let cfg = EdmConfig::from_json_file(config)?;
        // A config from elsewhere than beside the weights is named too: either may be wrong.
        let file = if config == config_path_for(weights) {
            weights.display().to_string()
        } else {
            format!("{} (with config {})", weights.display(), config.display())
        };
        Ok(Self::from_named(&cfg, &tensors, &file, device, namespace)?)
    }

    /// Writes the weights under EDM's names, and the config beside them (same path, `.json`).
    pub fn save(&self, weights: &Path) -> Result<(), ModelError> {
        self.save_with_metadata(weights, &[])
    }

    /// [`EdmPrecond::save`] with extra safetensors metadata (key, value).
    pub fn save_with_metadata(&self, weights: &Path, metadata: &[(&str, String)]) -> Result<(), ModelError> {
        let mut named = named_tensors(self);
        named.metadata.insert("format".into(), "pt".into());
        for (k, v) in metadata {
            named.metadata.insert((*k).into(), v.clone());
        }
        named.write(weights)?;
        let json = config_path_for(weights);
        write_atomic(&json, self.config.resolved().to_json().as_bytes())
            .map_err(|e| WeightError::Io { path: json.display().to_string(), msg: e.to_string() })?;
        Ok(())
    }

    /// The same network with its backbone in bfloat16 (`true`) or float32.
    pub fn with_bf16_body(mut self, on: bool) -> Self {
        self.bf16_body = on;
        self
    }

    fn body_dtype(&self) -> FloatDType {
        if self.bf16_body { FloatDType::BF16 } else { FloatDType::F32 }
    }

    pub fn label_dim(&self) -> usize {
        self.config.label_dim
    }

    /// Image shape [C, H, W] the network works on.
    pub fn image_shape(&self) -> [usize; 3] {
        let r = self.config.img_resolution;
        [self.config.img_channels, r, r]
    }

    pub fn sigma_data(&self) -> f64 {
        self.config.sigma_data
    }

    /// D(x; sigma, labels). `x` [N, C, H, W], `sigma` [N], `class_labels` [N, L] (or `None`:
    /// zeros, i.e. no class, as EDM does).
    pub fn forward(&self, x: Tensor<4>, sigma: Tensor<1>, class_labels: Option<Tensor<2>>) -> Tensor<4> {
        self.forward_augmented(x, sigma, class_labels, None)
    }

    pub fn forward_augmented(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        class_labels: Option<Tensor<2>>,
        augment_labels: Option<Tensor<2>>,
    ) -> Tensor<4> {
        let p = self.preconditioning(&x, sigma, class_labels);
        let x_in = (x.clone() * p.c_in).cast(self.body_dtype());
        let f_x = match &self.model {
            Backbone::Dhariwal(net) => net.forward(x_in, p.c_noise, p.labels, augment_labels),
            Backbone::Song(net) => net.forward(x_in, p.c_noise, p.labels, augment_labels),
            Backbone::Mlp(net) => net.forward(x_in, p.c_noise, p.labels),
        };
        x * p.c_skip + f_x.cast(FloatDType::F32) * p.c_out
    }

    /// The backbone's encoder output for D(x; sigma, labels), [N, C, r, r] (the toy MLP's last
    /// hidden layer as [N, hidden, 1, 1]): DMD2's `return_bottleneck`, which its GAN head reads.
    pub fn bottleneck(&self, x: Tensor<4>, sigma: Tensor<1>, class_labels: Option<Tensor<2>>) -> Tensor<4> {
        let p = self.preconditioning(&x, sigma, class_labels);
        let x_in = (x * p.c_in).cast(self.body_dtype());
        let features = match &self.model {
            Backbone::Dhariwal(net) => net.encode(x_in, p.c_noise, p.labels, None).0,
            Backbone::Song(net) => net.encode(x_in, p.c_noise, p.labels, None).0,
            Backbone::Mlp(net) => {
                let h = net.encode(x_in, p.c_noise, p.labels);
                let [n, c] = h.dims();
                h.reshape([n, c, 1, 1])
            }
        };
        features.cast(FloatDType::F32)
    }

    /// Channels and resolution of [`EdmPrecond::bottleneck`].
    pub fn bottleneck_shape(&self) -> (usize, usize) {
        let c = &self.config;
        match c.model_type {
            ModelType::ToyMLP => (c.hidden_dim(), 1),
            _ => {
                let mult = c.channel_mult();
                (c.model_channels() * mult[mult.len() - 1], c.img_resolution >> (mult.len() - 1))
            }
        }
    }

    fn preconditioning(&self, x: &Tensor<4>, sigma: Tensor<1>, class_labels: Option<Tensor<2>>) -> Preconditioning {
        let sd = self.config.sigma_data;
        let n = sigma.dims()[0];
        let labels = match (self.config.label_dim, class_labels) {
            (0, _) => None,
            (l, None) => Some(Tensor::zeros([1, l], &x.device())),
            (_, Some(labels)) => Some(labels),
        };
        let sigma4 = sigma.clone().reshape([n, 1, 1, 1]);
        let s2 = sigma4.clone().square();
        Preconditioning {
            c_skip: s2.clone().add_scalar(sd * sd).recip().mul_scalar(sd * sd),
            c_out: sigma4.mul_scalar(sd) / s2.clone().add_scalar(sd * sd).sqrt(),
            c_in: s2.add_scalar(sd * sd).sqrt().recip(),
            c_noise: sigma.log().div_scalar(4.0),
            labels,
        }
    }
}

/// EDM's c_skip, c_out, c_in (each [N, 1, 1, 1]), c_noise [N], and the class labels (zeros
/// when the network is conditional and none are given, as EDM does).
struct Preconditioning {
    c_skip: Tensor<4>,
    c_out: Tensor<4>,
    c_in: Tensor<4>,
    c_noise: Tensor<1>,
    labels: Option<Tensor<2>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::HostTensor;
    use burn::module::Module;

    fn out(net: &EdmPrecond, device: &Device, labels: bool) -> Vec<f32> {
        let n = 4;
        let x = HostTensor::new(vec![n, 3, 8, 8], (0..n * 192).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect());
        let s = HostTensor::new(vec![n], vec![0.5; n]);
        let l = HostTensor::new(vec![n, 3], (0..n * 3).map(|i| if i % 3 == 1 { 1.0 } else { 0.0 }).collect());
        let y = net.forward(x.to_tensor(device), s.to_tensor(device), labels.then(|| l.to_tensor(device)));
        HostTensor::from_tensor(y).data
    }

    #[test]
    fn dropout_and_label_dropout_only_in_training() {
        let cfg = EdmConfig::from_json_str(
            r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 3, "model_type": "SongUNet", "model_channels": 16,
                "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.3, "label_dropout": 0.5}"#,
        )
        .unwrap();
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        // Training (autodiff device): two calls draw different masks.
        let net = EdmPrecond::new(&cfg, &ad, 0);
        ad.seed(1);
        let a = out(&net, &ad, true);
        let b = out(&net, &ad, true);
        assert_ne!(a, b, "dropout must be active in training");
        // Evaluation (`valid()`, plain device): deterministic, and equal to the same network
        // with dropout switched off.
        let eval = net.valid();
        assert_eq!(out(&eval, &plain, true), out(&eval, &plain, true));
        let mut cfg0 = cfg.clone();
        cfg0.dropout = Some(0.0);
        cfg0.label_dropout = 0.0;
        let net0 = EdmPrecond::new(&cfg0, &plain, 0);
        assert_eq!(out(&eval, &plain, true), out(&net0, &plain, true));
        // No labels means zero labels (EDM's default).
        assert_ne!(out(&eval, &plain, false), out(&eval, &plain, true));
    }
}
