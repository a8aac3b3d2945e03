//! EDM's training loss (Karras et al. 2022, eq. 8 and Table 1):
//! sigma ~ exp(N(P_mean, P_std^2)), weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
//! loss = lambda(sigma) ||D(y + sigma n; sigma) - y||^2.

use burn::tensor::Tensor;
use dmd_models::EdmPrecond;
use serde::{Deserialize, Serialize};

/// EDM's noise-level distribution for training (the paper's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdmLossConfig {
    pub p_mean: f64,
    pub p_std: f64,
}

impl Default for EdmLossConfig {
    fn default() -> Self {
        Self { p_mean: -1.2, p_std: 1.2 }
    }
}

impl EdmLossConfig {
    /// sigma = exp(p_mean + p_std * z) for standard normal draws `z`.
    pub fn sigma_from_normal(&self, z: f64) -> f64 {
        (self.p_mean + self.p_std * z).exp()
    }
}

/// The per-sample EDM loss, summed over C, H, W: [N]. `images` are clean data y, `noise` unit
/// Gaussian n, `sigma` [N] the noise levels. The caller averages over the batch (EDM sums and
/// divides by the batch size: the same thing).
pub fn edm_loss(net: &EdmPrecond, images: Tensor<4>, labels: Option<Tensor<2>>, sigma: Tensor<1>, noise: Tensor<4>) -> Tensor<1> {
    let n = sigma.dims()[0];
    let sd2 = net.sigma_data().powi(2);
    let s4 = sigma.clone().reshape([n, 1, 1, 1]);
    let weight = (s4.clone().square().add_scalar(sd2) / s4.clone().square().mul_scalar(sd2)).reshape([n]);
    let noisy = images.clone() + noise * s4;
    let denoised = net.forward(noisy, sigma, labels);
    let per_sample = (denoised - images).square().reshape([n as i64, -1]).sum_dim(1).reshape([n]);
    per_sample * weight
}
