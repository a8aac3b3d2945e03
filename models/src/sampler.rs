//! EDM's samplers (`generate.py`, Algorithm 2 of Karras et al. 2022): the deterministic Heun
//! sampler, its stochastic variant (S_churn, S_min, S_max, S_noise) and Euler. As in EDM, the
//! state is kept in float64 between network calls and the network sees float32.
//!
//! One step (`num_steps = 1`) is a single denoiser call at sigma_max: DMD's one-step generator.

use crate::precond::EdmPrecond;
use crate::weights::HostTensor;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// Second order (Heun), EDM's default: 2 * num_steps - 1 network evaluations.
    #[default]
    Heun,
    /// First order: num_steps network evaluations.
    Euler,
}

impl std::str::FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "heun" => Ok(Self::Heun),
            "euler" => Ok(Self::Euler),
            other => Err(format!("unknown sampler `{other}` (expected heun or euler)")),
        }
    }
}

/// EDM's sampler settings, with EDM's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    pub solver: Solver,
    pub num_steps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    pub s_churn: f64,
    pub s_min: f64,
    pub s_max: f64,
    pub s_noise: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            solver: Solver::Heun,
            num_steps: 18,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

impl SamplerConfig {
    /// Network evaluations per image.
    pub fn nfe(&self) -> usize {
        match self.solver {
            Solver::Heun => 2 * self.num_steps - 1,
            Solver::Euler => self.num_steps,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        // At most a million steps (EDM uses up to 512): beyond that a typo, not a schedule.
        if self.num_steps == 0 || self.num_steps > 1_000_000 {
            return Err(format!("num_steps must lie in [1, 1000000], got {}", self.num_steps));
        }
        if !(self.sigma_min > 0.0 && self.sigma_max >= self.sigma_min && self.sigma_max.is_finite()) {
            return Err(format!("need 0 < sigma_min <= sigma_max < inf, got {} and {}", self.sigma_min, self.sigma_max));
        }
        if !(self.rho > 0.0) || self.s_churn < 0.0 || self.s_noise < 0.0 {
            return Err("rho must be positive, s_churn and s_noise non-negative".into());
        }
        Ok(())
    }
}

/// EDM's time steps: `num_steps` Karras noise levels from sigma_max down to sigma_min, then 0.
/// With one step the schedule is [sigma_max, 0].
pub fn edm_time_steps(num_steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    let mut t: Vec<f64> = (0..num_steps)
        .map(|i| {
            let frac = if num_steps > 1 { i as f64 / (num_steps - 1) as f64 } else { 0.0 };
            (a + frac * (b - a)).powf(rho)
        })
        .collect();
    t.push(0.0);
    t
}

/// Anything that denoises a host batch at one noise level: a network, a guided network, or a
/// closed-form denoiser in tests. `x` has shape [N, C, H, W]; returns D(x; sigma) in float32.
pub trait Denoiser {
    fn denoise(&self, x: &HostTensor, sigma: f64, labels: Option<&HostTensor>) -> HostTensor;
    /// Bounds on the noise levels the network supports (EDMPrecond's sigma_min/sigma_max).
    fn sigma_range(&self) -> (f64, f64) {
        (0.0, f64::INFINITY)
    }
}

/// A network on a device, evaluated in float32 as EDM does.
pub struct NetDenoiser<'a> {
    pub net: &'a EdmPrecond,
    pub device: Device,
}

impl Denoiser for NetDenoiser<'_> {
    fn denoise(&self, x: &HostTensor, sigma: f64, labels: Option<&HostTensor>) -> HostTensor {
        let n = x.shape[0];
        let xt: Tensor<4> = x.to_tensor(&self.device);
        let s = Tensor::<1>::from_data(TensorData::new(vec![sigma as f32; n], [n]), &self.device);
        let l = labels.map(|l| l.to_tensor::<2>(&self.device));
        HostTensor::from_tensor(self.net.forward(xt, s, l))
    }

    fn sigma_range(&self) -> (f64, f64) {
        (self.net.config.sigma_min, self.net.config.sigma_max())
    }
}

/// Runs the sampler from unit-variance `latents` [N, C, H, W]. `rngs` (one per image) supply
/// the churn noise of the stochastic sampler, so an image does not depend on its batch; they
/// are unused when s_churn = 0. `on_step` sees each finished step.
pub fn sample(
    net: &dyn Denoiser,
    latents: &HostTensor,
    labels: Option<&HostTensor>,
    cfg: &SamplerConfig,
    rngs: &mut [StdRng],
    mut on_step: impl FnMut(usize),
) -> HostTensor {
    assert!(cfg.s_churn == 0.0 || rngs.len() == latents.shape[0], "one churn RNG per image");
    let (net_min, net_max) = net.sigma_range();
    let t = edm_time_steps(cfg.num_steps, cfg.sigma_min.max(net_min), cfg.sigma_max.min(net_max), cfg.rho);
    let shape = latents.shape.clone();
    let to_f32 = |v: &[f64]| HostTensor::new(shape.clone(), v.iter().map(|&x| x as f32).collect());
    let eval = |x: &[f64], sigma: f64| -> Vec<f64> {
        net.denoise(&to_f32(x), sigma, labels).data.into_iter().map(f64::from).collect()
    };

    let mut x_next: Vec<f64> = latents.data.iter().map(|&z| f64::from(z) * t[0]).collect();
    for i in 0..cfg.num_steps {
        let (t_cur, t_next) = (t[i], t[i + 1]);
        let x_cur = x_next;
        // Temporarily raise the noise level (churn), then take an Euler step from t_hat.
        let gamma = if cfg.s_min <= t_cur && t_cur <= cfg.s_max {
            (cfg.s_churn / cfg.num_steps as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let t_hat = t_cur + gamma * t_cur;
        let x_hat: Vec<f64> = if gamma > 0.0 {
            let scale = (t_hat * t_hat - t_cur * t_cur).sqrt() * cfg.s_noise;
            let per_image = x_cur.len() / rngs.len().max(1);
            x_cur
                .chunks(per_image)
                .zip(rngs.iter_mut())
                .flat_map(|(xs, rng)| xs.iter().map(|&x| x + scale * rng.sample::<f64, _>(StandardNormal)).collect::<Vec<_>>())
                .collect()
        } else {
            x_cur
        };
        let denoised = eval(&x_hat, t_hat);
        let d_cur: Vec<f64> = x_hat.iter().zip(&denoised).map(|(x, d)| (x - d) / t_hat).collect();
        x_next = x_hat.iter().zip(&d_cur).map(|(x, d)| x + (t_next - t_hat) * d).collect();
        // Second-order correction, except on the last step (to sigma = 0).
        if cfg.solver == Solver::Heun && i + 1 < cfg.num_steps {
            let denoised = eval(&x_next, t_next);
            x_next = x_hat
                .iter()
                .zip(&d_cur)
                .zip(x_next.iter().zip(&denoised))
                .map(|((xh, dc), (xn, dn))| {
                    let d_prime = (xn - dn) / t_next;
                    xh + (t_next - t_hat) * (0.5 * dc + 0.5 * d_prime)
                })
                .collect();
        }
        on_step(i);
    }
    to_f32(&x_next)
}
