//! The two losses of Distribution Matching Distillation (Yin et al., DMD and DMD2), as the
//! official DMD2 code computes them (`main/edm/edm_guidance.py`).
//!
//! - Distribution matching (trains the generator): diffuse the generator's output x to a
//!   random noise level, denoise it with the real score (the teacher) and the fake score
//!   (trained on the generator's outputs), and move x along the normalised difference of the
//!   two predictions: the gradient of the KL between the diffused fake and real distributions.
//! - Fake score (trains the fake score): EDM-style denoising of the generator's outputs, so that
//!   the fake score tracks the generator's current distribution.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// DMD2's noise grid: `n` Karras sigmas from sigma_min to sigma_max, ascending (index 0 is
/// sigma_min), computed in float32 as the official code does.
pub fn karras_sigmas(n: usize, sigma_min: f32, sigma_max: f32, rho: f32) -> Vec<f32> {
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    let mut s: Vec<f32> = (0..n)
        .map(|i| {
            let ramp = if n > 1 { i as f32 / (n - 1) as f32 } else { 0.0 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect();
    s.reverse();
    s
}

/// Noise levels of the two losses, DMD2's defaults for EDM teachers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseGrid {
    pub num_timesteps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    /// The distribution-matching loss draws indices from
    /// [min_step_percent * n, max_step_percent * n] (DMD2: 2% and 98%).
    pub min_step_percent: f64,
    pub max_step_percent: f64,
}

impl Default for NoiseGrid {
    fn default() -> Self {
        Self { num_timesteps: 1000, sigma_min: 0.002, sigma_max: 80.0, rho: 7.0, min_step_percent: 0.02, max_step_percent: 0.98 }
    }
}

impl NoiseGrid {
    pub fn sigmas(&self) -> Vec<f32> {
        karras_sigmas(self.num_timesteps, self.sigma_min as f32, self.sigma_max as f32, self.rho as f32)
    }

    /// Index range [lo, hi) of the distribution-matching loss (DMD2: [20, 981) of 1000).
    pub fn dm_range(&self) -> (usize, usize) {
        let n = self.num_timesteps;
        let lo = (self.min_step_percent * n as f64) as usize;
        let hi = ((self.max_step_percent * n as f64) as usize + 1).min(n);
        (lo, hi)
    }
}

/// What the distribution-matching loss computed, for logging and tests.
pub struct DmLoss {
    /// 0.5 * mean((x - stopgrad(x - grad))^2) over all elements: d loss / dx = grad / numel.
    pub loss: Tensor<1>,
    /// The normalised gradient (p_real - p_fake) / mean|p_real|, NaNs zeroed.
    pub grad: Tensor<4>,
    pub pred_real: Tensor<4>,
    pub pred_fake: Tensor<4>,
    /// mean |x - D_real(x_t)| per sample, [N].
    pub weight: Tensor<1>,
}

/// How the distribution-matching gradient is weighted across noise levels. With
/// s = (D(x_t) - x_t) / sigma^2 the scores, the KL gradient is w(sigma) (s_fake - s_real); in
/// EDM's parameterisation (alpha = 1):
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DmWeighting {
    /// DMD's Eq. 8: w = sigma^2 C S / ||x - D_real(x_t)||_1, i.e. (D_fake - D_real) divided by
    /// the per-sample mean |x - D_real|: the same step size at every noise level.
    #[default]
    Dmd,
    /// w = sigma / alpha (the DMD paper's weighting ablation): (D_fake - D_real) / sigma.
    Sigma,
    /// w = sigma^3 / alpha (the DMD paper's weighting ablation, DreamFusion-like):
    /// sigma (D_fake - D_real).
    SigmaCubed,
}

/// The distribution-matching loss of the generator output `x` [N, C, H, W] (carrying the
/// generator's graph). `real` and `fake` denoise (x_t, sigma) without gradients: they receive
/// tensors off the autodiff graph and their outputs are treated as constants. `sigma` [N] and
/// `noise` [N, C, H, W] are the drawn noise levels and Gaussian noise.
pub fn distribution_matching_loss(
    x: Tensor<4>,
    sigma: Tensor<1>,
    noise: Tensor<4>,
    real: impl Fn(Tensor<4>, Tensor<1>) -> Tensor<4>,
    fake: impl Fn(Tensor<4>, Tensor<1>) -> Tensor<4>,
) -> DmLoss {
    weighted_distribution_matching_loss(x, sigma, noise, DmWeighting::Dmd, real, fake)
}

/// [`distribution_matching_loss`] with a choice of weighting across noise levels.
pub fn weighted_distribution_matching_loss(
    x: Tensor<4>,
    sigma: Tensor<1>,
    noise: Tensor<4>,
    weighting: DmWeighting,
    real: impl Fn(Tensor<4>, Tensor<1>) -> Tensor<4>,
    fake: impl Fn(Tensor<4>, Tensor<1>) -> Tensor<4>,
) -> DmLoss {
    let n = x.dims()[0];
    let sigma4 = sigma.clone().reshape([n, 1, 1, 1]);
    let x0 = x.clone().detach();
    let x_t = x0.clone() + noise.detach() * sigma4.clone();
    let pred_real = real(x_t.clone(), sigma.clone()).detach();
    let pred_fake = fake(x_t, sigma).detach();
    let p_real = x0.clone() - pred_real.clone();
    let p_fake = x0.clone() - pred_fake.clone();
    let weight = p_real.clone().abs().reshape([n as i64, -1]).mean_dim(1).reshape([n]);
    let grad = match weighting {
        DmWeighting::Dmd => nan_to_num((p_real - p_fake) / weight.clone().reshape([n, 1, 1, 1])),
        DmWeighting::Sigma => nan_to_num((p_real - p_fake) / sigma4),
        DmWeighting::SigmaCubed => nan_to_num((p_real - p_fake) * sigma4),
    };
    let target = x0 - grad.clone();
    let loss = (x - target).square().mean().mul_scalar(0.5);
    DmLoss { loss, grad, pred_real, pred_fake, weight }
}

/// The fake score's denoising loss on generator outputs `x` (detached here):
/// mean over all elements of (1/sigma^2 + 1/sigma_data^2) (D_fake(x + sigma n; sigma) - x)^2.
/// `fake` is the fake score with gradients. Returns (loss, prediction).
pub fn fake_score_loss(
    x: Tensor<4>,
    sigma: Tensor<1>,
    noise: Tensor<4>,
    sigma_data: f64,
    fake: impl Fn(Tensor<4>, Tensor<1>) -> Tensor<4>,
) -> (Tensor<1>, Tensor<4>) {
    let n = x.dims()[0];
    let x0 = x.detach();
    let s4 = sigma.clone().reshape([n, 1, 1, 1]);
    let noisy = x0.clone() + noise * s4.clone();
    let pred = fake(noisy, sigma);
    let weight = s4.powi_scalar(-2).add_scalar(1.0 / (sigma_data * sigma_data));
    let loss = ((pred.clone() - x0).square() * weight).mean();
    (loss, pred)
}

/// torch.nan_to_num: NaN -> 0, +-inf -> the largest finite float32.
fn nan_to_num(t: Tensor<4>) -> Tensor<4> {
    let nan = t.clone().is_nan();
    t.mask_fill(nan, 0.0).clamp(f32::MIN, f32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// The ablation weightings are w(sigma) (s_fake - s_real) with the scores
    /// s = (D(x_t) - x_t) / sigma^2, written out here from the scores rather than from D.
    #[test]
    fn weightings_scale_the_score_difference() {
        let device = Device::flex();
        let (n, d) = (3, 4);
        let x: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let noise: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.91).cos()).collect();
        let sigmas = [0.05f32, 1.0, 20.0];
        let t4 = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [n, d, 1, 1]), &device);
        let real = |x_t: Tensor<4>, _s: Tensor<1>| x_t.mul_scalar(0.5);
        let fake = |x_t: Tensor<4>, _s: Tensor<1>| x_t.mul_scalar(0.25).add_scalar(0.1);
        for (weighting, power) in [(DmWeighting::Sigma, 1), (DmWeighting::SigmaCubed, 3)] {
            let sigma = Tensor::<1>::from_data(TensorData::new(sigmas.to_vec(), [n]), &device);
            let dm = weighted_distribution_matching_loss(t4(x.clone()), sigma, t4(noise.clone()), weighting, real, fake);
            let grad = dm.grad.into_data().try_to_vec::<f32>().unwrap();
            for i in 0..n * d {
                let s = sigmas[i / d] as f64;
                let x_t = x[i] as f64 + s * noise[i] as f64;
                let score_real = (0.5 * x_t - x_t) / (s * s);
                let score_fake = (0.25 * x_t + 0.1 - x_t) / (s * s);
                let want = s.powi(power) * (score_fake - score_real);
                assert!((grad[i] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "{weighting:?} element {i}: {} vs {want}", grad[i]);
            }
        }
    }
}
