//! `dmd distill`: Distribution Matching Distillation of an EDM teacher into a one-step (or
//! few-step) generator, DMD and DMD2 recipes from a TOML config.
//!
//! Three networks of the teacher's architecture, all initialised from its weights: the real
//! score (the frozen teacher), the fake score (trained online on the generator's outputs) and
//! the generator G(z) = D(sigma_max z; conditioning_sigma). DMD adds a regression loss on
//! teacher pairs (LPIPS); DMD2 drops it for the two time-scale update rule and a GAN term
//! (a classifier head on the fake score's bottleneck, trained on real images), and trains
//! multi-step generators on their own samples (backward simulation). One training step is
//! [`Distiller::step`], top to bottom.

use crate::checkpoint::{load_optimizer, append_jsonl, guard_config, read_state, read_toml, recover, run_finished, truncate_jsonl, write_dir_atomically, NonFiniteGuard};
use crate::data::{DataConfig, DataSource};
use crate::device::Backend;
use crate::ema::ema_update;
use crate::optim::{clip_grad_norm, clip_grad_norm_joint, warmup_lr, Optim};
use crate::output::preview_png;
use crate::pairs::Pairs;
use crate::parallel::{rows, run_replicas, Backprop, Replica, Shards};
use crate::sample::{latents_from_seeds, progress, run_generator, take_rows};
use crate::teacher::{normals, step_seed, toy_eval_of, ToyEval};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dmd_datasets::{GaussianMixture, ToyDistribution, ToyKind};
use dmd_losses::dmd::{fake_score_loss, weighted_distribution_matching_loss, DmWeighting, NoiseGrid};
use dmd_losses::gan::{discriminator_gan_loss, generator_gan_loss, realism_logits};
use dmd_losses::regression::{l2, lpips, pseudo_huber, Regression};
use dmd_models::weights::{assign_ids, fork_named, load_named, named_tensors, write_atomic, HostTensor, NamedTensors};
use dmd_models::{config_path_for, EdmPrecond, GanHead, Lpips};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// EDM weights (safetensors); the config is the same path with `.json` unless given.
    pub weights: PathBuf,
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Classifier-free guidance of the real score (1: none); the fake score is never guided.
    #[serde(default = "one")]
    pub guidance_scale: f64,
    /// Use the exact denoiser of this built-in Gaussian mixture as the real score instead of
    /// the teacher network (toy experiments and tests; the networks still start from `weights`).
    #[serde(default)]
    pub exact_real_score: Option<ToyKind>,
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// The noise level the generator is conditioned on, and the scale of its input noise.
    pub conditioning_sigma: f64,
    /// Denoising steps (DMD: 1; DMD2's few-step generators: 4). Step k denoises at sigma_k and
    /// the next step starts from that prediction plus fresh noise of level sigma_{k+1}.
    pub steps: usize,
    /// Grid indices of steps 2..K (sigma_1 = conditioning_sigma). Default: evenly spaced from
    /// the top of the grid as DMD2's `denoising_step_list` (749, 499, 249 for 4 of 1000).
    pub timesteps: Option<Vec<usize>>,
    /// Train step k on inputs made by the generator's own first k steps (DMD2's backward
    /// simulation); otherwise on noised real images from `data`.
    pub backward_simulation: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self { conditioning_sigma: 80.0, steps: 1, timesteps: None, backward_simulation: true }
    }
}

impl GeneratorConfig {
    /// The noise level of each step, largest first.
    pub fn sigmas(&self, grid: &NoiseGrid) -> Vec<f64> {
        let n = grid.num_timesteps;
        let timesteps = self.timesteps.clone().unwrap_or_else(|| (1..self.steps).map(|k| n - 1 - k * (n / self.steps)).collect());
        let table = grid.sigmas();
        std::iter::once(self.conditioning_sigma).chain(timesteps.iter().map(|&t| table[t] as f64)).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of the distribution-matching loss (0 switches it off).
    pub dm_weight: f64,
    /// Its weighting across noise levels: "dmd" (DMD's Eq. 8), or the paper's ablations
    /// "sigma" (sigma/alpha) and "sigma_cubed" (sigma^3/alpha).
    pub dm_weighting: DmWeighting,
    pub regression: Regression,
    /// DMD: 0.25 (0.5 for unconditional CIFAR-10).
    pub regression_weight: f64,
    /// LPIPS weights for `regression = "lpips"`: torchvision's VGG16 features and the v0.1
    /// heads as safetensors (`tools/lpips_to_safetensors.py` makes both).
    pub lpips_vgg: Option<PathBuf>,
    pub lpips_heads: Option<PathBuf>,
    /// DMD2's GAN term: weight of the generator's loss (ImageNet: 3e-3; 0 switches it off)...
    pub gan_generator_weight: f64,
    /// ... and of the classifier's loss, added to the fake score's (ImageNet: 1e-2).
    pub gan_discriminator_weight: f64,
    /// Images reach the classifier diffused to a grid index drawn from [0, this) (DMD2's
    /// `diffusion_gan_max_timestep`, 1000); 0: clean images at sigma_min.
    pub gan_max_timestep: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            dm_weight: 1.0,
            dm_weighting: DmWeighting::Dmd,
            regression: Regression::None,
            regression_weight: 0.25,
            lpips_vgg: None,
            lpips_heads: None,
            gan_generator_weight: 0.0,
            gan_discriminator_weight: 0.0,
            gan_max_timestep: 1000,
        }
    }
}

impl LossConfig {
    fn gan(&self) -> bool {
        self.gan_generator_weight > 0.0 || self.gan_discriminator_weight > 0.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillTrainConfig {
    /// The global batch of one update.
    pub batch_size: usize,
    /// Run each batch as this many micro-batches, their gradients summed before the update:
    /// the same step to float rounding (dropout masks aside, drawn per micro-batch), in less
    /// memory (a run may resume with another count).
    pub micro_batches: usize,
    /// Data-parallel replicas, one per device (CUDA: GPUs 0..devices), each running
    /// `batch_size / devices` of the batch (as `micro_batches` parts); see [`crate::parallel`].
    pub devices: usize,
    /// Batch of teacher pairs for the regression loss (a separate batch, as in DMD; split into
    /// the same number of micro-batches).
    pub regression_batch_size: usize,
    pub total_steps: usize,
    pub generator_lr: f64,
    pub fake_lr: f64,
    pub adam_betas: [f64; 2],
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Clip each network's gradients to this global L2 norm (0: off).
    pub grad_clip: f64,
    /// Two time-scale update rule: fake-score updates per generator update (DMD 1, DMD2 5).
    pub fake_updates_per_generator_update: usize,
    /// Decay of an EMA of the generator (none when unset).
    pub ema_decay: Option<f64>,
    /// Run the three networks' bodies in bfloat16 (float32 master weights, preconditioning
    /// and losses), as DMD2 does on GPUs. Meant for CUDA; on the CPU backends it is slower.
    pub bf16_body: bool,
    pub seed: u64,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// Write a sample grid (scatter plot for 2-D points) of the generator this often; 0: never.
    pub sample_every: usize,
    /// Checkpoints kept: the latest plus `keep_checkpoints - 1` older ones in `checkpoint.history/`.
    pub keep_checkpoints: usize,
    /// An update whose loss or gradient is NaN/Inf is skipped; this many steps in a row with one
    /// stop the run.
    pub max_nonfinite_in_a_row: usize,
}

impl Default for DistillTrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            micro_batches: 1,
            devices: 1,
            regression_batch_size: 32,
            total_steps: 10_000,
            generator_lr: 5e-5,
            fake_lr: 5e-5,
            adam_betas: [0.9, 0.999],
            weight_decay: 0.01,
            warmup_steps: 0,
            grad_clip: 10.0,
            fake_updates_per_generator_update: 1,
            ema_decay: None,
            bf16_body: false,
            seed: 0,
            log_every: 100,
            checkpoint_every: 1000,
            sample_every: 1000,
            keep_checkpoints: 2,
            max_nonfinite_in_a_row: 10,
        }
    }
}

impl DistillTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let t = self;
        if t.batch_size == 0 || t.total_steps == 0 || t.fake_updates_per_generator_update == 0 || t.log_every == 0 || t.checkpoint_every == 0 {
            bail!("train: batch_size, total_steps, fake_updates_per_generator_update, log_every and checkpoint_every must be positive");
        }
        if t.keep_checkpoints == 0 || t.max_nonfinite_in_a_row == 0 || t.regression_batch_size == 0 {
            bail!("train.keep_checkpoints, train.max_nonfinite_in_a_row and train.regression_batch_size must be positive");
        }
        if t.micro_batches == 0 || t.devices == 0 || t.micro_batches * t.devices > t.batch_size {
            bail!("train.micro_batches x train.devices must lie in 1..=batch_size ({}), got {} x {}", t.batch_size, t.micro_batches, t.devices);
        }
        if !(t.generator_lr > 0.0 && t.generator_lr.is_finite() && t.fake_lr > 0.0 && t.fake_lr.is_finite()) {
            bail!("train.generator_lr and train.fake_lr must be positive, got {} and {}", t.generator_lr, t.fake_lr);
        }
        if !(t.weight_decay >= 0.0 && t.grad_clip >= 0.0) || t.adam_betas.iter().chain(t.ema_decay.as_ref()).any(|b| !(0.0..1.0).contains(b)) {
            bail!("train: weight_decay and grad_clip must not be negative, adam_betas and ema_decay must lie in [0, 1)");
        }
        Ok(())
    }

    /// These settings with those a resumed run may change reset: the length, the logging,
    /// checkpoint and sample intervals, the NaN limit, and how the batch is split.
    pub fn resume_key(&self) -> Self {
        Self { total_steps: 0, log_every: 0, checkpoint_every: 0, sample_every: 0, keep_checkpoints: 0, max_nonfinite_in_a_row: 0, micro_batches: 1, devices: 1, ..self.clone() }
    }

    /// The metrics.jsonl line of the steps in `window`, which ended with step index `step`.
    pub fn metrics_line(&self, window: &[StepStats], step: usize, seconds: f64, skipped_steps: u64) -> serde_json::Value {
        let mean = |f: &dyn Fn(&StepStats) -> Option<f64>| {
            let v: Vec<f64> = window.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        serde_json::json!({
            "step": step + 1,
            "dm_loss": mean(&|s| s.dm_loss),
            "regression_loss": mean(&|s| s.regression_loss),
            "gan_generator_loss": mean(&|s| s.gan_generator_loss),
            "fake_loss": mean(&|s| Some(s.fake_loss)),
            "gan_discriminator_loss": mean(&|s| s.gan_discriminator_loss),
            "generator_grad_norm": mean(&|s| s.generator_grad_norm),
            "fake_grad_norm": mean(&|s| Some(s.fake_grad_norm)),
            "generator_lr": warmup_lr(self.generator_lr, step, self.warmup_steps),
            "fake_lr": warmup_lr(self.fake_lr, step, self.warmup_steps),
            "samples_per_s": (window.len() * self.batch_size) as f64 / seconds.max(1e-9),
            "skipped_steps": skipped_steps,
        })
    }

    /// Writes the optimisers (`NAME_optim.bpk`) and `state.json` of a checkpoint at `step`
    /// into `dir` (the step is the position of the learning-rate schedule, of the data and of
    /// every RNG: step `s` draws from generators seeded with `step_seed(seed, s, stream)`).
    pub fn save_state(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard, optims: &[(&str, &Optim)]) -> Result<()> {
        for (name, opt) in optims {
            let p = dir.join(format!("{name}_optim.bpk"));
            opt.save(&p).map_err(|e| anyhow::anyhow!("{}: {e:?}", p.display()))?;
        }
        let state = serde_json::json!({
            "step": step,
            "seed": self.seed,
            "generator_lr": warmup_lr(self.generator_lr, step.saturating_sub(1), self.warmup_steps),
            "fake_lr": warmup_lr(self.fake_lr, step.saturating_sub(1), self.warmup_steps),
            "skipped_steps": nonfinite.skipped_steps,
        });
        std::fs::write(dir.join("state.json"), state.to_string())?;
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillEvalConfig {
    /// Evaluate the one-step generator on this built-in distribution at the end.
    pub toy: Option<ToyKind>,
    pub num_samples: usize,
    pub seed: u64,
}

impl Default for DistillEvalConfig {
    fn default() -> Self {
        Self { toy: None, num_samples: 2000, seed: 1_000_000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub out_dir: PathBuf,
    #[serde(default)]
    pub device: Backend,
    pub teacher: TeacherSpec,
    /// Folder of teacher pairs from `dmd make-pairs` (needed by the regression loss).
    #[serde(default)]
    pub pairs: Option<PathBuf>,
    /// Real images: DMD2's GAN term, and multi-step training without backward simulation.
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// Start the generator, fake score (and GAN head) from another run's `checkpoint/` folder,
    /// with fresh optimisers and step 0 (DMD2's second stage at a lower learning rate).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    #[serde(default)]
    pub generator: GeneratorConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub grid: NoiseGrid,
    #[serde(default)]
    pub train: DistillTrainConfig,
    #[serde(default)]
    pub eval: DistillEvalConfig,
}

impl DistillConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_toml(path)?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        if self.loss.regression != Regression::None && self.loss.regression_weight > 0.0 && self.pairs.is_none() {
            bail!("loss.regression = {:?} needs `pairs` (a folder from `dmd make-pairs`)", self.loss.regression);
        }
        let l = &self.loss;
        if l.regression == Regression::Lpips && l.regression_weight > 0.0 && (l.lpips_vgg.is_none() || l.lpips_heads.is_none()) {
            bail!("loss.regression = \"lpips\" needs loss.lpips_vgg and loss.lpips_heads (see tools/lpips_to_safetensors.py)");
        }
        if l.gan_generator_weight < 0.0 || l.gan_discriminator_weight < 0.0 || l.dm_weight < 0.0 || l.regression_weight < 0.0 {
            bail!("loss: weights must not be negative");
        }
        if l.gan() && self.data.is_none() {
            bail!("loss.gan_*_weight > 0 needs `data` (real images for the GAN classifier)");
        }
        if l.gan_max_timestep > self.grid.num_timesteps {
            bail!("loss.gan_max_timestep = {} exceeds grid.num_timesteps = {}", l.gan_max_timestep, self.grid.num_timesteps);
        }
        let g = &self.generator;
        if g.steps == 0 || !(g.conditioning_sigma > 0.0) {
            bail!("generator: steps and conditioning_sigma must be positive");
        }
        if let Some(ts) = &g.timesteps {
            if ts.len() + 1 != g.steps {
                bail!("generator.timesteps: {} indices for {} steps (give steps - 1: the first step is at conditioning_sigma)", ts.len(), g.steps);
            }
            if ts.iter().any(|&t| t >= self.grid.num_timesteps) || ts.windows(2).any(|w| w[1] >= w[0]) {
                bail!("generator.timesteps must decrease and lie in [0, {})", self.grid.num_timesteps);
            }
        } else if g.steps > self.grid.num_timesteps {
            bail!("generator.steps = {} exceeds grid.num_timesteps", g.steps);
        }
        if g.steps > 1 && !g.backward_simulation && self.data.is_none() {
            bail!("a multi-step generator without backward_simulation trains on noised real images: give `data`");
        }
        let gr = &self.grid;
        // A bound well past any schedule in use (DMD/DMD2: 1000), so that a typo cannot make
        // the noise grid a multi-gigabyte allocation.
        if gr.num_timesteps > 1_000_000 {
            bail!("grid.num_timesteps = {} is more than 1000000", gr.num_timesteps);
        }
        if !(gr.sigma_min > 0.0 && gr.sigma_max > gr.sigma_min && gr.sigma_max.is_finite() && gr.rho > 0.0) {
            bail!("need 0 < grid.sigma_min < grid.sigma_max < inf and grid.rho > 0, got grid.sigma_min = {}, grid.sigma_max = {}, grid.rho = {}", gr.sigma_min, gr.sigma_max, gr.rho);
        }
        if !(0.0 <= gr.min_step_percent && gr.min_step_percent < gr.max_step_percent && gr.max_step_percent <= 1.0) {
            bail!("need 0 <= grid.min_step_percent < grid.max_step_percent <= 1, got {} and {}", gr.min_step_percent, gr.max_step_percent);
        }
        let (lo, hi) = self.grid.dm_range();
        if lo >= hi || self.grid.num_timesteps < 2 {
            bail!("grid: empty distribution-matching range [{lo}, {hi})");
        }
        Ok(())
    }
}

/// The real score: the frozen teacher (optionally guided), or a mixture's exact denoiser.
pub enum RealScore {
    Teacher { net: EdmPrecond, guidance_scale: f64 },
    Exact(GaussianMixture),
}

impl RealScore {
    /// D_real(x_t; sigma, labels) on the plain device.
    pub fn denoise(&self, x: Tensor<4>, sigma: Tensor<1>, labels: Option<Tensor<2>>) -> Tensor<4> {
        match self {
            Self::Teacher { net, guidance_scale } => {
                let cond = net.forward(x.clone(), sigma.clone(), labels.clone());
                match labels {
                    Some(_) if *guidance_scale != 1.0 => {
                        let uncond = net.forward(x, sigma, None);
                        uncond.clone() + (cond - uncond).mul_scalar(*guidance_scale)
                    }
                    _ => cond,
                }
            }
            Self::Exact(mix) => {
                let device = x.device();
                let xs = HostTensor::from_tensor(x);
                let sigmas = HostTensor::from_tensor(sigma).data;
                HostTensor::new(xs.shape.clone(), mix.denoise_points(&xs.data, &sigmas)).to_tensor(&device)
            }
        }
    }
}

/// The one-step generator: G(z) = D(sigma z; sigma) with sigma the conditioning noise level.
pub fn generate(generator: &EdmPrecond, z: Tensor<4>, labels: Option<Tensor<2>>, sigma: f64) -> Tensor<4> {
    let (n, device) = (z.dims()[0], z.device());
    generator.forward(z.mul_scalar(sigma), filled(n, sigma, &device), labels)
}

/// The generator's sampling chain over `sigmas` (largest first): x = sigma_1 z, then
/// x0 = G(x; sigma_k) and x = x0 + sigma_{k+1} noise(k). One step is [`generate`].
pub fn generate_steps(generator: &EdmPrecond, z: Tensor<4>, labels: Option<Tensor<2>>, sigmas: &[f64], mut noise: impl FnMut(usize) -> Tensor<4>) -> Tensor<4> {
    let mut x0 = generate(generator, z, labels.clone(), sigmas[0]);
    for (k, &sigma) in sigmas.iter().enumerate().skip(1) {
        let n = x0.dims()[0];
        let x = x0 + noise(k).mul_scalar(sigma);
        x0 = generator.forward(x.clone(), filled(n, sigma, &x.device()), labels.clone());
    }
    x0
}

fn filled(n: usize, value: f64, device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(vec![value as f32; n], [n]), device)
}

/// What one step did, for the log.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepStats {
    pub dm_loss: Option<f64>,
    pub regression_loss: Option<f64>,
    pub gan_generator_loss: Option<f64>,
    pub generator_grad_norm: Option<f64>,
    pub fake_loss: f64,
    pub gan_discriminator_loss: Option<f64>,
    pub fake_grad_norm: f64,
    /// What was not finite when an update was skipped (none: both applied).
    pub nonfinite: Option<String>,
}

impl StepStats {
    pub(crate) fn add_nonfinite(&mut self, what: String) {
        self.nonfinite = Some(match self.nonfinite.take() {
            Some(first) => format!("{first} and {what}"),
            None => what,
        });
    }
}

/// One clipped optimiser step of the generator from the gradients `bp` summed over the step's
/// micro-batches, unless the loss or the gradient norm is NaN/Inf: then nothing changes and
/// `stats` records why. Returns whether the step was applied.
pub(crate) fn generator_update<M: Module>(bp: Backprop, generator: &mut M, optim: &mut Optim, lr: f64, grad_clip: f64, stats: &mut StepStats) -> bool {
    let mut grads = match bp.grads {
        Some(g) if bp.loss.is_finite() => g,
        _ => {
            stats.add_nonfinite(format!("generator loss {}", bp.loss));
            return false;
        }
    };
    let norm = clip_grad_norm(&mut grads, &*generator, grad_clip);
    stats.generator_grad_norm = Some(norm);
    if !norm.is_finite() {
        stats.add_nonfinite(format!("generator gradient norm {norm}"));
        return false;
    }
    optim.step_in_place(lr, generator, grads);
    true
}

/// The fake score's update from the gradients `bp` of its loss (with the GAN classifier's,
/// whose head shares one clipping norm with the fake score, as DMD2 clips its guidance model
/// as a whole); skipped and recorded in `stats` when the loss or the norm is NaN/Inf.
pub(crate) fn fake_update<F: Module>(bp: Backprop, fake: &mut F, optim: &mut Optim, gan: Option<&mut Gan>, lr: f64, grad_clip: f64, stats: &mut StepStats) {
    let mut fake_grads = match bp.grads {
        Some(g) if bp.loss.is_finite() => g,
        _ => {
            stats.add_nonfinite(format!("fake-score loss {}", bp.loss));
            return;
        }
    };
    match (gan, bp.head_grads) {
        (Some(gan), Some(mut head_grads)) => {
            stats.fake_grad_norm = clip_grad_norm_joint(&mut fake_grads, &*fake, &mut head_grads, &gan.head, grad_clip);
            if stats.fake_grad_norm.is_finite() {
                gan.optim.step_in_place(lr, &mut gan.head, head_grads);
            }
        }
        _ => stats.fake_grad_norm = clip_grad_norm(&mut fake_grads, &*fake, grad_clip),
    }
    if !stats.fake_grad_norm.is_finite() {
        stats.add_nonfinite(format!("fake-score gradient norm {}", stats.fake_grad_norm));
        return;
    }
    optim.step_in_place(lr, fake, fake_grads);
}

/// DMD2's GAN classifier: the head on the fake score's bottleneck and its optimiser (its real
/// images are the run's `data`).
pub struct Gan {
    pub head: GanHead,
    pub optim: Optim,
}

/// `total + weight * term` (`weight * term` when there is no total yet).
pub(crate) fn add_weighted(total: &mut Option<Tensor<1>>, term: Tensor<1>, weight: f64) {
    let term = term.mul_scalar(weight);
    *total = Some(match total.take() {
        Some(t) => t + term,
        None => term,
    });
}

/// Adds a part's `value` (its loss weighted by its share of the batch) to a loss's batch mean.
pub(crate) fn add_stat(stat: &mut Option<f64>, value: f64) {
    *stat = Some(stat.unwrap_or(0.0) + value);
}

/// Sums a step's loss values (batch means of this replica's rows) over the replicas.
pub(crate) fn sum_stats<const N: usize>(replica: &Replica, stats: [&mut Option<f64>; N]) {
    let mut values: Vec<f64> = stats.iter().map(|s| s.unwrap_or(0.0)).collect();
    replica.sum_values(&mut values);
    for (s, v) in stats.into_iter().zip(values) {
        if s.is_some() {
            *s = Some(v);
        }
    }
}

/// The generator's input for a batch, on the plain device (see [`Distiller::generator_input`]).
struct GeneratorInput {
    /// Rows `first..` of the batch's inputs (this replica's, or all).
    x: Tensor<4>,
    first: usize,
    sigma: f64,
    /// Every row's labels.
    labels: Option<Tensor<2>>,
}

/// Training state of a distillation run.
pub struct Distiller {
    pub cfg: DistillConfig,
    pub device: Device,
    pub ad: Device,
    pub real: RealScore,
    pub generator: EdmPrecond,
    pub fake: EdmPrecond,
    pub generator_ema: Option<EdmPrecond>,
    pub generator_optim: Optim,
    pub fake_optim: Optim,
    pub pairs: Option<Pairs>,
    pub lpips: Option<Lpips>,
    pub gan: Option<Gan>,
    /// Real images (the GAN classifier's, and multi-step training without backward simulation).
    pub data: Option<DataSource>,
    pub sigmas: Vec<f32>,
    /// The generator's noise levels, one per step.
    pub generator_sigmas: Vec<f64>,
    pub shape: [usize; 3],
    pub label_dim: usize,
    /// This replica's place in a data-parallel run.
    pub replica: Replica,
}

impl Distiller {
    /// Builds the three networks from the teacher (or from a run's checkpoint).
    pub fn new(cfg: &DistillConfig, checkpoint: Option<&Path>) -> Result<Self> {
        Self::replica(cfg, checkpoint, Replica::single(), cfg.device.device()?)
    }

    /// [`Distiller::new`] for `replica` of a data-parallel run, on `device`.
    pub fn replica(cfg: &DistillConfig, checkpoint: Option<&Path>, replica: Replica, device: Device) -> Result<Self> {
        let ad = device.clone().autodiff();
        let t = &cfg.teacher;
        let cfg_path = t.config.clone().unwrap_or_else(|| config_path_for(&t.weights));
        let teacher = EdmPrecond::load(&t.weights, &cfg_path, &device, "real")?;
        let (shape, label_dim) = (teacher.image_shape(), teacher.label_dim());
        let real = match t.exact_real_score {
            Some(kind) => {
                let mix = ToyDistribution::new(kind).mixture().cloned().with_context(|| format!("teacher.exact_real_score: {kind:?} is not a Gaussian mixture"))?;
                if shape != [2, 1, 1] {
                    bail!("teacher.exact_real_score needs a teacher on 2-D points, this one works on {shape:?}");
                }
                RealScore::Exact(mix)
            }
            None => RealScore::Teacher { net: teacher.clone().with_bf16_body(cfg.train.bf16_body), guidance_scale: t.guidance_scale },
        };
        let tr = &cfg.train;
        let adamw = || crate::optim::adamw(tr.adam_betas[0] as f32, tr.adam_betas[1] as f32, 1e-8, tr.weight_decay as f32);
        let load_optim = |dir: &Path, name: &str| {
            let p = dir.join(format!("{name}_optim.bpk"));
            load_optimizer(adamw(), &p)
        };
        // Networks from this run's checkpoint (resume) or another run's (init_from, weights only).
        let weights_from = checkpoint.or(cfg.init_from.as_deref());
        if let (None, Some(dir)) = (checkpoint, &cfg.init_from) {
            if !dir.join("generator.safetensors").exists() {
                bail!("init_from: {} holds no generator.safetensors (give a run's checkpoint/ folder)", dir.display());
            }
        }
        let (generator, fake, generator_ema, generator_optim, fake_optim) = match weights_from {
            Some(dir) => {
                let load = |name: &str, dev: &Device| EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), dev, name);
                let ema = match (tr.ema_decay, dir.join("generator_ema.safetensors").exists()) {
                    (Some(_), true) => Some(load("generator_ema", &device)?.valid()),
                    (Some(_), false) => Some(fork_named(&load("generator", &device)?, "generator_ema")),
                    (None, _) => None,
                };
                let (g_opt, f_opt) = match checkpoint {
                    Some(dir) => (load_optim(dir, "generator")?, load_optim(dir, "fake")?),
                    None => (adamw(), adamw()),
                };
                (load("generator", &ad)?, load("fake", &ad)?, ema, g_opt, f_opt)
            }
            None => {
                // Each network is its own load of the teacher, with ids of its own namespace:
                // Burn's clone() would share parameters, gradients and optimiser state.
                let generator = EdmPrecond::load(&t.weights, &cfg_path, &ad, "generator")?;
                let fake = EdmPrecond::load(&t.weights, &cfg_path, &ad, "fake")?;
                let ema = tr.ema_decay.map(|_| fork_named(&teacher, "generator_ema"));
                (generator, fake, ema, adamw(), adamw())
            }
        };
        let (generator, fake) = (generator.with_bf16_body(tr.bf16_body), fake.with_bf16_body(tr.bf16_body));
        let pairs = match &cfg.pairs {
            Some(p) if cfg.loss.regression != Regression::None => {
                let pairs = Pairs::load(p)?;
                if pairs.latents.shape[1..] != shape[..] {
                    bail!("{}: pairs of shape {:?}, the teacher works on {shape:?}", p.display(), &pairs.latents.shape[1..]);
                }
                let parts = tr.micro_batches * tr.devices;
                if tr.regression_batch_size.min(pairs.len()) < parts {
                    bail!("{}: {} pairs, regression batch {}: fewer than one per micro-batch ({parts})", p.display(), pairs.len(), tr.regression_batch_size);
                }
                Some(pairs)
            }
            _ => None,
        };
        let lpips = match (&cfg.loss.regression, &cfg.loss.lpips_vgg, &cfg.loss.lpips_heads) {
            (Regression::Lpips, Some(vgg), Some(heads)) => {
                if !(shape[0] == 1 || shape[0] == 3) || shape[1] < 2 {
                    bail!("loss.regression = \"lpips\" needs 1- or 3-channel images, the teacher works on {shape:?}");
                }
                Some(Lpips::load(vgg, heads, &ad)?)
            }
            _ => None,
        };
        let data = match &cfg.data {
            Some(d) => {
                let data = DataSource::open(d)?;
                if data.shape() != shape || data.label_dim() != label_dim {
                    bail!(
                        "data: {} gives {:?} with {} classes, the teacher works on {shape:?} with {label_dim}",
                        data.describe(),
                        data.shape(),
                        data.label_dim()
                    );
                }
                Some(data)
            }
            None => None,
        };
        let gan = match (cfg.loss.gan(), &data) {
            (true, Some(_)) => {
                let (c, r) = fake.bottleneck_shape();
                let head = match weights_from.filter(|d| d.join("gan_head.safetensors").exists()) {
                    Some(dir) => {
                        let p = dir.join("gan_head.safetensors");
                        load_named(GanHead::placeholder(c, r, &ad), &NamedTensors::read(&p)?, &p.display().to_string(), "gan_head")?
                    }
                    None => assign_ids(GanHead::new(c, r, &ad, step_seed(tr.seed, 0, 12)), "gan_head"),
                };
                let optim = match checkpoint {
                    Some(dir) => load_optim(dir, "gan_head")?,
                    None => adamw(),
                };
                Some(Gan { head, optim })
            }
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            device,
            ad,
            real,
            generator,
            fake,
            generator_ema,
            generator_optim,
            fake_optim,
            pairs,
            lpips,
            gan,
            data,
            sigmas: cfg.grid.sigmas(),
            generator_sigmas: cfg.generator.sigmas(&cfg.grid),
            shape,
            label_dim,
            replica,
        })
    }

    fn normal_tensor(&self, rng: &mut StdRng, n: usize, device: &Device) -> Tensor<4> {
        let [c, h, w] = self.shape;
        Tensor::<4>::from_data(TensorData::new(normals(rng, n * c * h * w), [n, c, h, w]), device)
    }

    /// Noise and one-hot labels (random classes) for a batch, on `device`.
    fn noise_batch(&self, rng: &mut StdRng, n: usize, device: &Device) -> (Tensor<4>, Option<Tensor<2>>) {
        let z = self.normal_tensor(rng, n, device);
        let labels = (self.label_dim > 0).then(|| {
            let l = self.label_dim;
            let v: Vec<f32> = (0..n).flat_map(|_| {
                let k = rng.random_range(0..l);
                (0..l).map(move |j| if j == k { 1.0 } else { 0.0 })
            }).collect();
            Tensor::<2>::from_data(TensorData::new(v, [n, l]), device)
        });
        (z, labels)
    }

    /// Noise levels drawn uniformly from the grid indices [lo, hi).
    fn sigma_batch(&self, rng: &mut StdRng, n: usize, (lo, hi): (usize, usize), device: &Device) -> Tensor<1> {
        let s: Vec<f32> = (0..n).map(|_| self.sigmas[rng.random_range(lo..hi)]).collect();
        Tensor::from_data(TensorData::new(s, [n]), device)
    }

    /// The noise level and noise of the GAN classifier's input (DMD2's diffusion GAN).
    fn gan_noise(&self, rng: &mut StdRng, n: usize) -> (Tensor<1>, Option<Tensor<4>>) {
        match self.cfg.loss.gan_max_timestep {
            0 => (filled(n, self.sigmas[0] as f64, &self.ad), None),
            hi => {
                let sigma = self.sigma_batch(rng, n, (0, hi), &self.ad);
                (sigma, Some(self.normal_tensor(rng, n, &self.ad)))
            }
        }
    }

    /// The generator's input for this replica's `parts` of a batch of `n` (noise, or for a
    /// multi-step generator the input of one random step: its own earlier steps' output
    /// (backward simulation, run part by part) or noised real images), its noise level and
    /// labels, on the plain device. The draws are the whole batch's.
    fn generator_input(&self, rng: &mut StdRng, n: usize, parts: &Shards, mine: &Range<usize>) -> Result<GeneratorInput> {
        let sigmas = &self.generator_sigmas;
        let (z, labels) = self.noise_batch(rng, n, &self.device);
        let k = if sigmas.len() > 1 { rng.random_range(0..sigmas.len()) } else { 0 };
        let (x, labels) = if k == 0 {
            (z.mul_scalar(sigmas[0]), labels)
        } else if self.cfg.generator.backward_simulation {
            let noise: Vec<Tensor<4>> = (0..k).map(|_| self.normal_tensor(rng, n, &self.device)).collect();
            let frozen = self.generator.valid();
            let mut x = Vec::with_capacity(mine.len());
            for part in mine.clone() {
                let r = parts.rows(part);
                let labels = labels.as_ref().map(|l| rows(l, &r));
                let x0 = generate_steps(&frozen, rows(&z, &r), labels, &sigmas[..k], |j| rows(&noise[j - 1], &r));
                x.push(x0 + rows(&noise[k - 1], &r).mul_scalar(sigmas[k]));
            }
            let first = parts.rows(mine.start).start;
            return Ok(GeneratorInput { x: Tensor::cat(x, 0), sigma: sigmas[k], labels, first });
        } else {
            let data = self.data.as_ref().context("multi-step training without backward simulation needs `data`")?;
            let (images, real_labels) = data.batch(n, rng)?;
            let x = images.to_tensor::<4>(&self.device) + self.normal_tensor(rng, n, &self.device).mul_scalar(sigmas[k]);
            (x, real_labels.map(|l| l.to_tensor(&self.device)))
        };
        Ok(GeneratorInput { x, sigma: sigmas[k], labels, first: 0 })
    }

    /// The generator's outputs for rows `r` of `input`'s batch, on the autodiff device, with
    /// gradients to the generator when `train`; and their labels.
    fn generator_forward(&self, input: &GeneratorInput, r: &Range<usize>, train: bool) -> (Tensor<4>, Option<Tensor<2>>) {
        let (x_in, labels) = (rows(&input.x, &(r.start - input.first..r.end - input.first)), input.labels.as_ref().map(|l| rows(l, r)));
        let sigma = input.sigma;
        let x = if train {
            self.generator.forward(Tensor::from_inner(x_in), filled(r.len(), sigma, &self.ad), labels.clone().map(Tensor::from_inner))
        } else {
            Tensor::from_inner(self.generator.valid().forward(x_in, filled(r.len(), sigma, &self.device), labels.clone()))
        };
        (x, labels.map(Tensor::from_inner))
    }

    /// One training step: a generator update (every `fake_updates_per_generator_update`-th
    /// step, as DMD2's TTUR), then a fake-score (and GAN classifier) update. All randomness
    /// comes from (seed, step) and is drawn for the whole batch before any network runs; the
    /// losses then run over `train.micro_batches` parts of it (see [`crate::parallel`]).
    pub fn step(&mut self, step: usize) -> Result<StepStats> {
        let cfg = self.cfg.clone();
        let (tr, loss_cfg) = (&cfg.train, &cfg.loss);
        let mut rng = StdRng::seed_from_u64(step_seed(tr.seed, step as u64, 10));
        self.ad.seed(step_seed(tr.seed, step as u64, 11));
        let bs = tr.batch_size;
        let (parts, mine) = self.replica.parts(bs, tr.micro_batches);
        let sigma_g = cfg.generator.conditioning_sigma;
        let mut stats = StepStats::default();

        // 1. Generator: distribution matching, GAN, regression on teacher pairs.
        let mut generated: Option<Vec<Option<(Tensor<4>, Option<Tensor<2>>)>>> = None;
        if step % tr.fake_updates_per_generator_update == 0 {
            let g_in = self.generator_input(&mut rng, bs, &parts, &mine)?;
            let dm_draw = (loss_cfg.dm_weight > 0.0).then(|| (self.sigma_batch(&mut rng, bs, cfg.grid.dm_range(), &self.ad), self.normal_tensor(&mut rng, bs, &self.ad)));
            let gan_draw = (self.gan.is_some() && loss_cfg.gan_generator_weight > 0.0).then(|| self.gan_noise(&mut rng, bs));
            let pairs = self.pairs.as_ref().filter(|_| loss_cfg.regression_weight > 0.0);
            let reg_idx: Vec<usize> = match pairs {
                Some(p) => (0..tr.regression_batch_size.min(p.len())).map(|_| rng.random_range(0..p.len())).collect(),
                None => Vec::new(),
            };
            let reg_parts = Shards::new(reg_idx.len(), parts.count);
            let mut bp = Backprop::default();
            let mut outputs = Vec::with_capacity(mine.len());
            for part in mine.clone() {
                let (r, w) = (parts.rows(part), parts.weight(part));
                let (x, labels) = self.generator_forward(&g_in, &r, true);
                let mut total: Option<Tensor<1>> = None;
                if let Some((sigma, noise)) = &dm_draw {
                    let fake = self.fake.valid();
                    let plain_labels = labels.clone().map(|l| l.inner());
                    let real = &self.real;
                    let dm = weighted_distribution_matching_loss(
                        x.clone(),
                        rows(sigma, &r),
                        rows(noise, &r),
                        loss_cfg.dm_weighting,
                        |x_t, s| Tensor::from_inner(real.denoise(x_t.inner(), s.inner(), plain_labels.clone())),
                        |x_t, s| Tensor::from_inner(fake.forward(x_t.inner(), s.inner(), plain_labels.clone())),
                    );
                    add_stat(&mut stats.dm_loss, w * dm.loss.clone().into_scalar::<f64>());
                    add_weighted(&mut total, dm.loss, w * loss_cfg.dm_weight);
                }
                if let (Some(gan), Some((sigma, noise))) = (&self.gan, &gan_draw) {
                    // Gradients flow through the (frozen) fake score and head into the images only.
                    let noise = noise.as_ref().map(|n| rows(n, &r));
                    let logits = realism_logits(&self.fake.clone().no_grad(), &gan.head.clone().no_grad(), x.clone(), rows(sigma, &r), noise, labels.clone());
                    let loss = generator_gan_loss(logits);
                    add_stat(&mut stats.gan_generator_loss, w * loss.clone().into_scalar::<f64>());
                    add_weighted(&mut total, loss, w * loss_cfg.gan_generator_weight);
                }
                let reg_rows = &reg_idx[reg_parts.rows(part)];
                if let (Some(pairs), false) = (pairs, reg_rows.is_empty()) {
                    let w = reg_parts.weight(part);
                    let z_ref = take_rows(&pairs.latents, reg_rows).to_tensor::<4>(&self.ad);
                    let y_ref = take_rows(&pairs.images, reg_rows).to_tensor::<4>(&self.ad);
                    let l_ref = pairs.labels.as_ref().map(|l| take_rows(l, reg_rows).to_tensor::<2>(&self.ad));
                    let g_ref = generate(&self.generator, z_ref, l_ref, sigma_g);
                    let reg = match (loss_cfg.regression, &self.lpips) {
                        (Regression::L2, _) => l2(g_ref, y_ref),
                        (Regression::PseudoHuber, _) => pseudo_huber(g_ref, y_ref),
                        (Regression::Lpips, Some(net)) => lpips(g_ref, y_ref, net),
                        (Regression::None | Regression::Lpips, _) => unreachable!("validated"),
                    };
                    add_stat(&mut stats.regression_loss, w * reg.clone().into_scalar::<f64>());
                    add_weighted(&mut total, reg, w * loss_cfg.regression_weight);
                }
                if let Some(total) = total {
                    bp.add(total, &self.generator, None::<&GanHead>);
                }
                outputs.push(Some((x.detach(), labels)));
            }
            let has_loss = dm_draw.is_some() || gan_draw.is_some() || !reg_idx.is_empty();
            self.replica.reduce(&mut bp, &self.generator, None::<&GanHead>)?;
            sum_stats(&self.replica, [&mut stats.dm_loss, &mut stats.gan_generator_loss, &mut stats.regression_loss]);
            // A NaN/Inf loss or gradient skips the update (weights, EMA, optimiser untouched).
            let lr = warmup_lr(tr.generator_lr, step, tr.warmup_steps);
            let applied = !has_loss || generator_update(bp, &mut self.generator, &mut self.generator_optim, lr, tr.grad_clip, &mut stats);
            generated = Some(outputs);
            if let (true, Some(ema), Some(decay)) = (applied, self.generator_ema.take(), tr.ema_decay) {
                self.generator_ema = Some(ema_update(ema, &self.generator, decay));
            }
        }

        // 2. Fake score: denoise the generator's current outputs; the GAN classifier tells
        //    them from real images on the fake score's bottleneck.
        let g_in = match generated {
            Some(_) => None,
            None => Some(self.generator_input(&mut rng, bs, &parts, &mine)?),
        };
        let sigma = self.sigma_batch(&mut rng, bs, (0, self.sigmas.len()), &self.ad);
        let noise = self.normal_tensor(&mut rng, bs, &self.ad);
        let disc_draw = match (&self.gan, &self.data, loss_cfg.gan_discriminator_weight > 0.0) {
            (Some(_), Some(data), true) => {
                let (images, labels) = data.batch(bs, &mut rng)?;
                let real = (images.to_tensor::<4>(&self.ad), labels.map(|l| l.to_tensor::<2>(&self.ad)));
                Some((real, self.gan_noise(&mut rng, bs), self.gan_noise(&mut rng, bs)))
            }
            _ => None,
        };
        let fake = &self.fake;
        let mut bp = Backprop::default();
        for part in mine.clone() {
            let (r, w) = (parts.rows(part), parts.weight(part));
            let (x, labels) = match (&mut generated, &g_in) {
                (Some(outputs), _) => std::mem::take(&mut outputs[part - mine.start]).expect("one output per micro-batch"),
                (None, Some(g_in)) => self.generator_forward(g_in, &r, false),
                (None, None) => unreachable!("drawn above"),
            };
            let (mut loss, _) = fake_score_loss(x.clone(), rows(&sigma, &r), rows(&noise, &r), fake.sigma_data(), |x_t, s| fake.forward(x_t, s, labels.clone()));
            stats.fake_loss += w * loss.clone().into_scalar::<f64>();
            if let (Some(gan), Some(((real_images, real_labels), (sigma_r, noise_r), (sigma_f, noise_f)))) = (&self.gan, &disc_draw) {
                let part_of = |n: &Option<Tensor<4>>| n.as_ref().map(|n| rows(n, &r));
                let real_labels = real_labels.as_ref().map(|l| rows(l, &r));
                let logits_real = realism_logits(fake, &gan.head, rows(real_images, &r), rows(sigma_r, &r), part_of(noise_r), real_labels);
                let logits_fake = realism_logits(fake, &gan.head, x, rows(sigma_f, &r), part_of(noise_f), labels);
                let d = discriminator_gan_loss(logits_real, logits_fake);
                add_stat(&mut stats.gan_discriminator_loss, w * d.clone().into_scalar::<f64>());
                loss = loss + d.mul_scalar(loss_cfg.gan_discriminator_weight);
            }
            bp.add(loss.mul_scalar(w), fake, self.gan.as_ref().map(|g| &g.head));
        }
        self.replica.reduce(&mut bp, fake, self.gan.as_ref().map(|g| &g.head))?;
        let mut fake_loss = Some(stats.fake_loss);
        sum_stats(&self.replica, [&mut fake_loss, &mut stats.gan_discriminator_loss]);
        stats.fake_loss = fake_loss.unwrap_or(0.0);
        let lr = warmup_lr(tr.fake_lr, step, tr.warmup_steps);
        fake_update(bp, &mut self.fake, &mut self.fake_optim, self.gan.as_mut(), lr, tr.grad_clip, &mut stats);
        Ok(stats)
    }

    /// The generator to sample from: its EMA when kept; float32 throughout, as
    /// `dmd sample --generator` runs it.
    pub fn sampling_generator(&self) -> EdmPrecond {
        self.generator_ema.clone().unwrap_or_else(|| self.generator.valid()).with_bf16_body(false)
    }

    /// The checkpoint: every network, head and optimiser, the EMA, the config, and the state
    /// (the step is the position of the learning-rate schedule, of the data and of every RNG:
    /// step `s` draws from generators seeded with `step_seed(seed, s, stream)`).
    fn save(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard) -> Result<()> {
        let tr = &self.cfg.train;
        write_dir_atomically(dir, tr.keep_checkpoints, |tmp| {
            std::fs::write(tmp.join("config.toml"), toml::to_string_pretty(&self.cfg)?)?;
            self.generator.save(&tmp.join("generator.safetensors"))?;
            self.fake.save(&tmp.join("fake.safetensors"))?;
            if let Some(ema) = &self.generator_ema {
                ema.save(&tmp.join("generator_ema.safetensors"))?;
            }
            let mut optims = vec![("generator", &self.generator_optim), ("fake", &self.fake_optim)];
            if let Some(gan) = &self.gan {
                named_tensors(&gan.head).write(&tmp.join("gan_head.safetensors"))?;
                optims.push(("gan_head", &gan.optim));
            }
            tr.save_state(tmp, step, nonfinite, &optims)
        })
    }
}

/// The safetensors metadata key holding a generator's noise levels (JSON list, one per step).
pub const GENERATOR_SIGMAS_KEY: &str = "dmd_generator_sigmas";

/// Saves a generator with its noise levels, so that `dmd sample --generator` runs its steps.
pub fn save_generator(generator: &EdmPrecond, path: &Path, sigmas: &[f64]) -> Result<()> {
    generator.save_with_metadata(path, &[(GENERATOR_SIGMAS_KEY, serde_json::to_string(sigmas)?)])?;
    Ok(())
}

/// A generator's noise levels from its file's metadata (one step at `default` when absent).
pub fn generator_sigmas_of(path: &Path, default: f64) -> Result<Vec<f64>> {
    let meta = NamedTensors::read_metadata(path)?;
    match meta.get(GENERATOR_SIGMAS_KEY) {
        Some(s) => {
            let sigmas: Vec<f64> = serde_json::from_str(s).with_context(|| format!("{}: metadata `{GENERATOR_SIGMAS_KEY}` is not a list of numbers", path.display()))?;
            if sigmas.is_empty() || sigmas.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                bail!("{}: metadata `{GENERATOR_SIGMAS_KEY}` must list positive noise levels", path.display());
            }
            Ok(sigmas)
        }
        None => Ok(vec![default]),
    }
}

/// Samples of `generator` over `sigmas` for seeds `seed..seed+n` (host, [n, C, H, W]); the
/// noise of later steps comes from each image's seed too.
pub fn generator_samples(generator: &EdmPrecond, device: &Device, n: usize, seed: u64, sigmas: &[f64]) -> HostTensor {
    let seeds: Vec<u64> = (0..n as u64).map(|i| seed + i).collect();
    let (z, labels) = latents_from_seeds(&seeds, generator.image_shape(), generator.label_dim(), None);
    run_generator(generator, device, &z, labels.as_ref(), &seeds, sigmas)
}

pub struct DistillRun {
    pub generator: PathBuf,
    pub eval: Option<ToyEval>,
}

/// The config a run must keep to be resumed.
fn resume_key(cfg: &DistillConfig) -> DistillConfig {
    let mut c = cfg.clone();
    c.train = c.train.resume_key();
    c.eval = DistillEvalConfig::default();
    c.device = Backend::Cpu;
    c.out_dir = PathBuf::new();
    c
}

/// Whether `out_dir` holds the finished run of this config (generator written, checkpoint at
/// the last step, same weights-shaping settings).
pub fn finished(cfg: &DistillConfig) -> Result<bool> {
    run_finished(&cfg.out_dir, cfg, resume_key, cfg.train.total_steps, &cfg.out_dir.join("generator.safetensors"))
}

/// Distils (or resumes) the run of `cfg`; `force_resume` continues a run folder made with a
/// different config.
pub fn distill(cfg: &DistillConfig, show_progress: bool, force_resume: bool) -> Result<DistillRun> {
    let out = &cfg.out_dir;
    let mut replicas = Replica::group(cfg.device, cfg.train.devices)?;
    let (main, main_device) = replicas.remove(0);
    // A new run checks its inputs (teacher, pairs, data) before it creates its folder.
    let fresh = if out.exists() { None } else { Some(Distiller::replica(cfg, None, main.clone(), main_device.clone())?) };
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let saved = out.join("config.toml");
    let previous = if saved.exists() { Some(DistillConfig::from_file(&saved)?) } else { None };
    guard_config(&saved, cfg, previous, resume_key, force_resume)?;
    let ckpt = out.join("checkpoint");
    recover(&ckpt)?;
    let (mut d, start, mut nonfinite) = if ckpt.join("state.json").exists() {
        let (step, state) = read_state(&ckpt)?;
        let guard = NonFiniteGuard::resumed(state["skipped_steps"].as_u64().unwrap_or(0));
        let d = Distiller::replica(cfg, Some(&ckpt), main.clone(), main_device)?;
        eprintln!("resuming {} from step {step}", out.display());
        (d, step, guard)
    } else {
        let d = match fresh {
            Some(d) => d,
            None => Distiller::replica(cfg, None, main.clone(), main_device)?,
        };
        (d, 0, NonFiniteGuard::default())
    };
    let metrics = out.join("metrics.jsonl");
    truncate_jsonl(&metrics, start)?;
    let l = &cfg.loss;
    eprintln!(
        "distilling {} into a {}-step generator on {} x {} (dm x {}, regression {:?} x {}, GAN x {}/{}, {} fake update(s) per generator update)",
        cfg.teacher.weights.display(),
        cfg.generator.steps,
        cfg.train.devices,
        cfg.device,
        l.dm_weight,
        l.regression,
        l.regression_weight,
        l.gan_generator_weight,
        l.gan_discriminator_weight,
        cfg.train.fake_updates_per_generator_update
    );
    // The other replicas, one thread each, from the same weights; only this one writes files.
    let from = ckpt.join("state.json").exists().then_some(ckpt.as_path());
    let guard = nonfinite.clone();
    run_replicas(
        &main,
        || run_steps(&mut d, &cfg.train, start, &mut nonfinite, &ckpt, out, show_progress),
        replicas,
        |r, device| Distiller::replica(cfg, from, r.clone(), device).and_then(|mut d| run_steps(&mut d, &cfg.train, start, &mut guard.clone(), &ckpt, out, false)),
    )?;
    let generator = d.sampling_generator();
    let path = out.join("generator.safetensors");
    save_generator(&generator, &path, &d.generator_sigmas)?;
    eprintln!("one-step generator: {} (sample it with `dmd sample --generator {}`)", path.display(), path.display());
    let eval = match cfg.eval.toy {
        Some(kind) => {
            let x = generator_samples(&generator, &d.device, cfg.eval.num_samples, cfg.eval.seed, &d.generator_sigmas);
            let e = toy_eval_of(&x.data, &ToyDistribution::new(kind), cfg.eval.seed, d.generator_sigmas.len());
            write_atomic(&out.join("eval.json"), serde_json::to_string_pretty(&e)?.as_bytes())?;
            eprintln!("{}", e.summary());
            Some(e)
        }
        None => None,
    };
    Ok(DistillRun { generator: path, eval })
}

/// What the training loop of [`run_steps`] drives: one step, a checkpoint, a preview image.
pub(crate) trait StepRunner {
    fn run_step(&mut self, step: usize) -> Result<StepStats>;
    fn save_checkpoint(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard) -> Result<()>;
    fn preview_png(&self) -> Result<Vec<u8>>;
    /// Whether this is the replica that writes files (always, outside data-parallel runs).
    fn is_main(&self) -> bool {
        true
    }
}

impl StepRunner for Distiller {
    fn run_step(&mut self, step: usize) -> Result<StepStats> {
        self.step(step)
    }
    fn save_checkpoint(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard) -> Result<()> {
        self.save(dir, step, nonfinite)
    }
    fn preview_png(&self) -> Result<Vec<u8>> {
        preview(&self.sampling_generator(), &self.device, &self.generator_sigmas, self.cfg.eval.seed)
    }
    fn is_main(&self) -> bool {
        self.replica.is_main()
    }
}

/// Steps `start..total_steps` of a distillation: the NaN/Inf guard, metrics.jsonl every
/// `log_every` steps, checkpoints (none inside a streak of skipped steps: the one kept stays the
/// last good one) and sample grids in `out/samples/`.
/// Replicas other than the main one (see [`StepRunner::is_main`]) run the same steps and write
/// nothing.
pub(crate) fn run_steps(d: &mut impl StepRunner, tr: &DistillTrainConfig, start: usize, nonfinite: &mut NonFiniteGuard, ckpt: &Path, out: &Path, show_progress: bool) -> Result<()> {
    let main = d.is_main();
    let metrics = out.join("metrics.jsonl");
    let bar = if show_progress && main { progress(tr.total_steps as u64, "distill") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(start as u64);
    let mut window: Vec<StepStats> = Vec::new();
    let mut t0 = Instant::now();
    for step in start..tr.total_steps {
        let stats = d.run_step(step)?;
        if let (Some(what), true) = (&stats.nonfinite, main) {
            bar.suspend(|| eprintln!("step {step}: {what}; update skipped"));
        }
        nonfinite.record(step, stats.nonfinite.as_deref(), tr.max_nonfinite_in_a_row, ckpt)?;
        if !main {
            continue;
        }
        window.push(stats);
        let done = step + 1;
        bar.inc(1);
        if done % tr.log_every == 0 || done == tr.total_steps {
            let line = tr.metrics_line(&window, step, t0.elapsed().as_secs_f64(), nonfinite.skipped_steps);
            append_jsonl(&metrics, &line)?;
            bar.set_message(format!("distill fake loss {:.4}", line["fake_loss"].as_f64().unwrap_or(0.0)));
            window.clear();
            t0 = Instant::now();
        }
        if (done % tr.checkpoint_every == 0 && nonfinite.in_a_row == 0) || done == tr.total_steps {
            d.save_checkpoint(ckpt, done, nonfinite)?;
        }
        if tr.sample_every > 0 && (done % tr.sample_every == 0 || done == tr.total_steps) {
            write_atomic(&out.join("samples").join(format!("step-{done:07}.png")), &d.preview_png()?)?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// A sample grid (scatter plot for 2-D points) of the generator, same seeds every time.
fn preview(generator: &EdmPrecond, device: &Device, sigmas: &[f64], seed: u64) -> Result<Vec<u8>> {
    let points = generator.image_shape() == [2, 1, 1];
    preview_png(&generator_samples(generator, device, if points { 1000 } else { 64 }, seed, sigmas))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<DistillConfig> {
        let cfg: DistillConfig = toml::from_str(&format!("out_dir = \"x\"\n{extra}\n[teacher]\nweights = \"t.safetensors\"\n"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn generator_steps_follow_dmd2() {
        let grid = NoiseGrid::default();
        let table = grid.sigmas();
        // DMD2's denoising_step_list for 4 steps of 1000: range(999, 0, -250) = 999, 749, 499, 249.
        let cfg = config("[generator]\nsteps = 4").unwrap();
        let want: Vec<f64> = [999, 749, 499, 249].iter().map(|&t| table[t] as f64).collect();
        let got = cfg.generator.sigmas(&grid);
        assert_eq!(got[0], 80.0);
        assert!((want[0] - 80.0).abs() < 1e-4);
        assert_eq!(&got[1..], &want[1..]);
        assert_eq!(config("").unwrap().generator.sigmas(&grid), vec![80.0]);
        let explicit = config("[generator]\nsteps = 2\ntimesteps = [600]").unwrap();
        assert_eq!(explicit.generator.sigmas(&grid), vec![80.0, table[600] as f64]);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let err = |extra: &str| format!("{:#}", config(extra).unwrap_err());
        assert!(err("[generator]\nsteps = 3\ntimesteps = [600]").contains("generator.timesteps"));
        assert!(err("[generator]\nsteps = 3\ntimesteps = [300, 600]").contains("must decrease"));
        assert!(err("[generator]\nsteps = 2\nbackward_simulation = false").contains("data"));
        assert!(err("[loss]\ngan_generator_weight = 0.003").contains("data"));
        assert!(err("pairs = \"p\"\n[loss]\nregression = \"lpips\"").contains("lpips_vgg"));
        assert!(err("[loss]\ngan_max_timestep = 2000").contains("gan_max_timestep"));
        assert!(err("[loss]\ndm_weight = -1").contains("negative"));
        assert!(err("[loss]\nbogus = 1").contains("bogus"));
    }
}
