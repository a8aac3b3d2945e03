//! Built-in 2-D toy distributions. Points are stored as [2, 1, 1] "images" so that the same
//! preconditioning, samplers and losses serve them and the UNets. Mixtures know their exact
//! EDM denoiser, E[x0 | x0 + sigma n = x], which tests and DMD's toy experiments use as a
//! perfect "real score".

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToyKind {
    /// Eight Gaussians on a circle.
    EightGaussians,
    /// A 5x5 grid of Gaussians.
    TwentyFiveGaussians,
    /// The 4x4 checkerboard (8 filled squares).
    Checkerboard,
    /// Two interleaved half circles.
    TwoMoons,
    /// A 2-D swiss roll.
    SwissRoll,
}

impl std::str::FromStr for ToyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "eight_gaussians" | "8gaussians" => Self::EightGaussians,
            "twenty_five_gaussians" | "25gaussians" => Self::TwentyFiveGaussians,
            "checkerboard" => Self::Checkerboard,
            "two_moons" => Self::TwoMoons,
            "swiss_roll" => Self::SwissRoll,
            _ => return Err(format!("unknown toy distribution `{s}` (eight_gaussians, twenty_five_gaussians, checkerboard, two_moons, swiss_roll)")),
        })
    }
}

/// An isotropic Gaussian mixture in 2-D.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianMixture {
    pub means: Vec<[f64; 2]>,
    pub std: f64,
    pub weights: Vec<f64>,
}

impl GaussianMixture {
    pub fn new(means: Vec<[f64; 2]>, std: f64) -> Self {
        let w = 1.0 / means.len() as f64;
        let weights = vec![w; means.len()];
        Self { means, std, weights }
    }

    /// Modes on a circle of radius `radius`.
    pub fn ring(k: usize, radius: f64, std: f64) -> Self {
        Self::new((0..k).map(|i| {
            let a = 2.0 * PI * i as f64 / k as f64;
            [radius * a.cos(), radius * a.sin()]
        }).collect(), std)
    }

    /// A g x g grid spanning [-half, half]^2.
    pub fn grid(g: usize, half: f64, std: f64) -> Self {
        let step = 2.0 * half / (g - 1) as f64;
        let mut means = Vec::new();
        for i in 0..g {
            for j in 0..g {
                means.push([-half + step * i as f64, -half + step * j as f64]);
            }
        }
        Self::new(means, std)
    }

    pub fn num_modes(&self) -> usize {
        self.means.len()
    }

    /// Draws a component by weight; returns (point, component).
    pub fn sample(&self, rng: &mut StdRng) -> ([f64; 2], usize) {
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut k = self.weights.len() - 1;
        for (i, w) in self.weights.iter().enumerate() {
            acc += w;
            if u < acc {
                k = i;
                break;
            }
        }
        let m = self.means[k];
        let p = [m[0] + self.std * rng.sample::<f64, _>(StandardNormal), m[1] + self.std * rng.sample::<f64, _>(StandardNormal)];
        (p, k)
    }

    /// The exact EDM denoiser D(x; sigma) = E[x0 | x], optionally for one component only
    /// (class-conditional). Per component the posterior mean is
    /// mu_k + s^2/(s^2+sigma^2) (x - mu_k), weighted by the responsibility of component k.
    pub fn denoise(&self, x: [f64; 2], sigma: f64, component: Option<usize>) -> [f64; 2] {
        let var = self.std * self.std + sigma * sigma;
        let shrink = self.std * self.std / var;
        let post = |k: usize| {
            let m = self.means[k];
            [m[0] + shrink * (x[0] - m[0]), m[1] + shrink * (x[1] - m[1])]
        };
        if let Some(k) = component {
            return post(k);
        }
        // Responsibilities in log space for stability at small sigma.
        let logits: Vec<f64> = self
            .means
            .iter()
            .zip(&self.weights)
            .map(|(m, w)| w.ln() - ((x[0] - m[0]).powi(2) + (x[1] - m[1]).powi(2)) / (2.0 * var))
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ws: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = ws.iter().sum();
        let mut out = [0.0; 2];
        for (k, w) in ws.iter().enumerate() {
            let p = post(k);
            out[0] += w / total * p[0];
            out[1] += w / total * p[1];
        }
        out
    }

    /// `denoise` over flat points [x0, y0, x1, y1, ...], with one noise level per point.
    pub fn denoise_points(&self, points: &[f32], sigmas: &[f32]) -> Vec<f32> {
        points
            .chunks_exact(2)
            .zip(sigmas)
            .flat_map(|(p, &s)| {
                let d = self.denoise([p[0] as f64, p[1] as f64], s as f64, None);
                [d[0] as f32, d[1] as f32]
            })
            .collect()
    }

    /// Index of the nearest mode and the distance to it.
    pub fn nearest_mode(&self, p: [f64; 2]) -> (usize, f64) {
        self.means
            .iter()
            .enumerate()
            .map(|(k, m)| (k, ((p[0] - m[0]).powi(2) + (p[1] - m[1]).powi(2)).sqrt()))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one mode")
    }
}

/// A built-in toy distribution, scaled to a standard deviation near EDM's sigma_data = 0.5.
#[derive(Clone, Debug)]
pub struct ToyDistribution {
    pub kind: ToyKind,
    mixture: Option<GaussianMixture>,
}

impl ToyDistribution {
    pub fn new(kind: ToyKind) -> Self {
        let mixture = match kind {
            ToyKind::EightGaussians => Some(GaussianMixture::ring(8, 0.7, 0.04)),
            ToyKind::TwentyFiveGaussians => Some(GaussianMixture::grid(5, 0.8, 0.03)),
            _ => None,
        };
        Self { kind, mixture }
    }

    /// The mixture, for the distributions that are one (exact denoiser, mode metrics).
    pub fn mixture(&self) -> Option<&GaussianMixture> {
        self.mixture.as_ref()
    }

    /// Number of classes when labels are used: the mixture components; other kinds have none.
    pub fn num_classes(&self) -> usize {
        self.mixture.as_ref().map_or(0, |m| m.num_modes())
    }

    /// One point and its class (the mixture component; 0 for the other kinds).
    pub fn sample(&self, rng: &mut StdRng) -> ([f64; 2], usize) {
        if let Some(m) = &self.mixture {
            return m.sample(rng);
        }
        let n = |rng: &mut StdRng| rng.sample::<f64, StandardNormal>(StandardNormal);
        let p = match self.kind {
            ToyKind::Checkerboard => {
                // 4x4 board on [-1, 1]^2, cells of width 0.5; filled where (col + row) is even.
                loop {
                    let x: f64 = rng.random::<f64>() * 2.0 - 1.0;
                    let y: f64 = rng.random::<f64>() * 2.0 - 1.0;
                    let (cx, cy) = (((x + 1.0) / 0.5).floor() as i64, ((y + 1.0) / 0.5).floor() as i64);
                    if (cx + cy) % 2 == 0 {
                        break [x * 0.8, y * 0.8];
                    }
                }
            }
            ToyKind::TwoMoons => {
                let t: f64 = rng.random::<f64>() * PI;
                let upper = rng.random::<bool>();
                let (x, y) = if upper { (t.cos(), t.sin()) } else { (1.0 - t.cos(), 0.5 - t.sin()) };
                [(x - 0.5) * 0.5 + 0.02 * n(rng), (y - 0.25) * 0.5 + 0.02 * n(rng)]
            }
            ToyKind::SwissRoll => {
                let t = 1.5 * PI * (1.0 + 2.0 * rng.random::<f64>());
                [t * t.cos() / 14.0 * 0.8 + 0.02 * n(rng), t * t.sin() / 14.0 * 0.8 + 0.02 * n(rng)]
            }
            ToyKind::EightGaussians | ToyKind::TwentyFiveGaussians => unreachable!("mixtures handled above"),
        };
        (p, 0)
    }

    /// `n` points as a flat [n * 2] vector, and their classes.
    pub fn sample_n(&self, n: usize, rng: &mut StdRng) -> (Vec<f32>, Vec<usize>) {
        let mut pts = Vec::with_capacity(2 * n);
        let mut cls = Vec::with_capacity(n);
        for _ in 0..n {
            let (p, k) = self.sample(rng);
            pts.push(p[0] as f32);
            pts.push(p[1] as f32);
            cls.push(k);
        }
        (pts, cls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixture_denoiser_limits() {
        let m = GaussianMixture::ring(8, 0.7, 0.04);
        // Tiny sigma: denoising returns the point itself.
        let x = [0.3, -0.2];
        let d = m.denoise(x, 1e-6, None);
        assert!((d[0] - x[0]).abs() < 1e-6 && (d[1] - x[1]).abs() < 1e-6);
        // Huge sigma: the posterior is the prior, whose mean is the origin.
        let d = m.denoise([50.0, 50.0], 1e4, None);
        assert!(d[0].abs() < 1e-3 && d[1].abs() < 1e-3);
    }

    #[test]
    fn toy_samples_have_near_unit_half_std() {
        let mut rng = StdRng::seed_from_u64(0);
        for kind in [ToyKind::EightGaussians, ToyKind::TwentyFiveGaussians, ToyKind::Checkerboard, ToyKind::TwoMoons, ToyKind::SwissRoll] {
            let (pts, _) = ToyDistribution::new(kind).sample_n(4000, &mut rng);
            let mean: f64 = pts.iter().map(|&v| v as f64).sum::<f64>() / pts.len() as f64;
            let std = (pts.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / pts.len() as f64).sqrt();
            assert!((0.25..0.75).contains(&std), "{kind:?}: std {std}");
        }
    }
}
