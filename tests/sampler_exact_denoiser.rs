//! EDM's samplers driven by the exact denoiser of a Gaussian mixture (closed form, no network):
//! the deterministic, Euler and stochastic samplers must all land on the mixture.

use dmd_datasets::{GaussianMixture, ToyDistribution, ToyKind};
use dmd_experiments::metrics::mode_stats;
use dmd_experiments::sample::latents_from_seeds;
use dmd_models::{sample, Denoiser, HostTensor, SamplerConfig, Solver};
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Exact(GaussianMixture);

impl Denoiser for Exact {
    fn denoise(&self, x: &HostTensor, sigma: f64, _labels: Option<&HostTensor>) -> HostTensor {
        let sigmas = vec![sigma as f32; x.shape[0]];
        HostTensor::new(x.shape.clone(), self.0.denoise_points(&x.data, &sigmas))
    }
}

#[test]
fn samplers_with_the_exact_denoiser_reproduce_the_mixture() {
    let dist = ToyDistribution::new(ToyKind::EightGaussians);
    let mix = dist.mixture().unwrap().clone();
    let n = 2000;
    let seeds: Vec<u64> = (0..n).collect();
    let (latents, _) = latents_from_seeds(&seeds, [2, 1, 1], 0, None);
    let exact = Exact(mix.clone());
    let configs = [
        ("heun 18", SamplerConfig::default()),
        ("euler 128", SamplerConfig { solver: Solver::Euler, num_steps: 128, ..SamplerConfig::default() }),
        ("stochastic heun 32", SamplerConfig { num_steps: 32, s_churn: 40.0, s_min: 0.01, s_max: 1.0, s_noise: 1.0, ..SamplerConfig::default() }),
    ];
    for (name, cfg) in configs {
        let mut rngs: Vec<StdRng> = (0..n).map(StdRng::seed_from_u64).collect();
        let out = sample(&exact, &latents, None, &cfg, &mut rngs, |_| {});
        let stats = mode_stats(&out.data, &mix);
        eprintln!("{name}: {stats:?}");
        assert_eq!(stats.modes_covered, 8, "{name}");
        assert!(stats.frac_near_mode > 0.97, "{name}: {stats:?}");
        assert!(stats.mode_kl < 0.02, "{name}: {stats:?}");
    }
    // With one step the sampler returns D(80 z; 80): the posterior mean, near the origin.
    let one = sample(&exact, &latents, None, &SamplerConfig { num_steps: 1, ..SamplerConfig::default() }, &mut [], |_| {});
    let r = one.data.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(r < 0.1, "one-step exact denoiser at sigma 80 gives the mean: max |x| {r}");
}
