//! `dmd distill`: Distribution Matching Distillation of an EDM teacher into a one-step
//! generator (DMD; DMD2's two time-scale update rule), from a TOML config.
//!
//! Three networks of the teacher's architecture, all initialised from its weights: the real
//! score (the frozen teacher), the fake score (trained online on the generator's outputs) and
//! the generator G(z) = D(sigma_max z; conditioning_sigma). One training step is
//! [`Distiller::step`], top to bottom.

use crate::checkpoint::{append_jsonl, guard_config, read_toml, recover, truncate_jsonl, write_dir_atomically};
use crate::data::DataConfig;
use crate::device::Backend;
use crate::ema::ema_update;
use crate::optim::{clip_grad_norm, warmup_lr};
use crate::pairs::Pairs;
use crate::sample::{latents_from_seeds, progress};
use crate::teacher::{normals, step_seed, toy_eval_of, ToyEval};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use dmd_datasets::{GaussianMixture, ToyDistribution, ToyKind};
use dmd_losses::dmd::{distribution_matching_loss, fake_score_loss, NoiseGrid};
use dmd_losses::regression::{l2, pseudo_huber, Regression};
use dmd_models::weights::{fork_named, write_atomic, HostTensor};
use dmd_models::{config_path_for, EdmPrecond};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
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
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self { conditioning_sigma: 80.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of the distribution-matching loss (0 switches it off).
    pub dm_weight: f64,
    pub regression: Regression,
    /// DMD: 0.25 (0.5 for unconditional CIFAR-10).
    pub regression_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { dm_weight: 1.0, regression: Regression::None, regression_weight: 0.25 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillTrainConfig {
    pub batch_size: usize,
    /// Batch of teacher pairs for the regression loss (a separate batch, as in DMD).
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
    pub seed: u64,
    pub log_every: usize,
    pub checkpoint_every: usize,
}

impl Default for DistillTrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
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
            seed: 0,
            log_every: 100,
            checkpoint_every: 1000,
        }
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
    /// Real data (reserved for DMD2's GAN term; unused yet).
    #[serde(default)]
    pub data: Option<DataConfig>,
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

    fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch_size == 0 || t.total_steps == 0 || t.fake_updates_per_generator_update == 0 || t.log_every == 0 || t.checkpoint_every == 0 {
            bail!("train: batch_size, total_steps, fake_updates_per_generator_update, log_every and checkpoint_every must be positive");
        }
        if self.loss.regression != Regression::None && self.loss.regression_weight > 0.0 && self.pairs.is_none() {
            bail!("loss.regression = {:?} needs `pairs` (a folder from `dmd make-pairs`)", self.loss.regression);
        }
        if self.loss.regression == Regression::Lpips {
            bail!("loss.regression = \"lpips\" is not implemented yet; use \"l2\" or \"pseudo_huber\"");
        }
        if self.data.is_some() {
            bail!("`data` (real images for DMD2's GAN term) is not implemented yet");
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
    let n = z.dims()[0];
    let s = Tensor::<1>::from_data(TensorData::new(vec![sigma as f32; n], [n]), &z.device());
    generator.forward(z.mul_scalar(sigma), s, labels)
}

/// What one step did, for the log.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepStats {
    pub dm_loss: Option<f64>,
    pub regression_loss: Option<f64>,
    pub generator_grad_norm: Option<f64>,
    pub fake_loss: f64,
    pub fake_grad_norm: f64,
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
    pub generator_optim: ModuleOptimizer,
    pub fake_optim: ModuleOptimizer,
    pub pairs: Option<Pairs>,
    pub sigmas: Vec<f32>,
    pub shape: [usize; 3],
    pub label_dim: usize,
}

impl Distiller {
    /// Builds the three networks from the teacher (or from a run's checkpoint).
    pub fn new(cfg: &DistillConfig, checkpoint: Option<&Path>) -> Result<Self> {
        let device = cfg.device.device()?;
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
            None => RealScore::Teacher { net: teacher.clone(), guidance_scale: t.guidance_scale },
        };
        let tr = &cfg.train;
        let adamw = |lr_betas: [f64; 2]| {
            AdamWConfig::new()
                .with_beta_1(lr_betas[0] as f32)
                .with_beta_2(lr_betas[1] as f32)
                .with_epsilon(1e-8)
                .with_weight_decay(tr.weight_decay as f32)
                .init()
        };
        let (generator, fake, generator_ema, generator_optim, fake_optim) = match checkpoint {
            Some(dir) => {
                let load = |name: &str, dev: &Device| EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), dev, name);
                let opt = |name: &str| {
                    let p = dir.join(format!("{name}_optim.bpk"));
                    adamw(tr.adam_betas).load(&p).map_err(|e| anyhow::anyhow!("{}: {e:?}", p.display()))
                };
                let ema = if tr.ema_decay.is_some() { Some(load("generator_ema", &device)?.valid()) } else { None };
                (load("generator", &ad)?, load("fake", &ad)?, ema, opt("generator")?, opt("fake")?)
            }
            None => {
                // Each network is its own load of the teacher, with ids of its own namespace:
                // Burn's clone() would share parameters, gradients and optimiser state.
                let generator = EdmPrecond::load(&t.weights, &cfg_path, &ad, "generator")?;
                let fake = EdmPrecond::load(&t.weights, &cfg_path, &ad, "fake")?;
                let ema = tr.ema_decay.map(|_| fork_named(&teacher, "generator_ema"));
                (generator, fake, ema, adamw(tr.adam_betas), adamw(tr.adam_betas))
            }
        };
        let pairs = match &cfg.pairs {
            Some(p) if cfg.loss.regression != Regression::None => {
                let pairs = Pairs::load(p)?;
                if pairs.latents.shape[1..] != shape[..] {
                    bail!("{}: pairs of shape {:?}, the teacher works on {shape:?}", p.display(), &pairs.latents.shape[1..]);
                }
                Some(pairs)
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
            sigmas: cfg.grid.sigmas(),
            shape,
            label_dim,
        })
    }

    /// Noise and one-hot labels (random classes) for a batch, on `device`.
    fn noise_batch(&self, rng: &mut StdRng, n: usize, device: &Device) -> (Tensor<4>, Option<Tensor<2>>) {
        let [c, h, w] = self.shape;
        let z = Tensor::<4>::from_data(TensorData::new(normals(rng, n * c * h * w), [n, c, h, w]), device);
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

    /// One training step: a generator update (every `fake_updates_per_generator_update`-th
    /// step, as DMD2's TTUR), then a fake-score update. All randomness comes from (seed, step).
    pub fn step(&mut self, step: usize) -> Result<StepStats> {
        let cfg = self.cfg.clone();
        let (tr, loss_cfg) = (&cfg.train, &cfg.loss);
        let mut rng = StdRng::seed_from_u64(step_seed(tr.seed, step as u64, 10));
        self.ad.seed(step_seed(tr.seed, step as u64, 11));
        let bs = tr.batch_size;
        let sigma_g = cfg.generator.conditioning_sigma;
        let mut stats = StepStats::default();
        let [c, h, w] = self.shape;

        // 1. Generator: distribution matching + regression on teacher pairs.
        let mut generated: Option<(Tensor<4>, Option<Tensor<2>>)> = None;
        if step % tr.fake_updates_per_generator_update == 0 {
            let (z, labels) = self.noise_batch(&mut rng, bs, &self.ad);
            let x = generate(&self.generator, z, labels.clone(), sigma_g);
            let mut total: Option<Tensor<1>> = None;
            if loss_cfg.dm_weight > 0.0 {
                let sigma = self.sigma_batch(&mut rng, bs, cfg.grid.dm_range(), &self.ad);
                let noise = Tensor::<4>::from_data(TensorData::new(normals(&mut rng, bs * c * h * w), [bs, c, h, w]), &self.ad);
                let fake = self.fake.valid();
                let plain_labels = labels.clone().map(|l| l.inner());
                let real = &self.real;
                let dm = distribution_matching_loss(
                    x.clone(),
                    sigma,
                    noise,
                    |x_t, s| Tensor::from_inner(real.denoise(x_t.inner(), s.inner(), plain_labels.clone())),
                    |x_t, s| Tensor::from_inner(fake.forward(x_t.inner(), s.inner(), plain_labels.clone())),
                );
                stats.dm_loss = Some(dm.loss.clone().into_scalar::<f64>());
                total = Some(dm.loss.mul_scalar(loss_cfg.dm_weight));
            }
            if let (Some(pairs), true) = (&self.pairs, loss_cfg.regression_weight > 0.0) {
                let m = tr.regression_batch_size.min(pairs.len());
                let idx: Vec<usize> = (0..m).map(|_| rng.random_range(0..pairs.len())).collect();
                let rows = |t: &HostTensor| {
                    let per: usize = t.shape[1..].iter().product();
                    let mut shape = t.shape.clone();
                    shape[0] = m;
                    HostTensor::new(shape, idx.iter().flat_map(|&i| t.data[i * per..(i + 1) * per].iter().copied()).collect())
                };
                let z_ref = rows(&pairs.latents).to_tensor::<4>(&self.ad);
                let y_ref = rows(&pairs.images).to_tensor::<4>(&self.ad);
                let l_ref = pairs.labels.as_ref().map(|l| rows(l).to_tensor::<2>(&self.ad));
                let g_ref = generate(&self.generator, z_ref, l_ref, sigma_g);
                let reg = match loss_cfg.regression {
                    Regression::L2 => l2(g_ref, y_ref),
                    Regression::PseudoHuber => pseudo_huber(g_ref, y_ref),
                    Regression::None | Regression::Lpips => unreachable!("validated"),
                };
                stats.regression_loss = Some(reg.clone().into_scalar::<f64>());
                let reg = reg.mul_scalar(loss_cfg.regression_weight);
                total = Some(match total {
                    Some(t) => t + reg,
                    None => reg,
                });
            }
            if let Some(total) = total {
                let value = total.clone().into_scalar::<f64>();
                if !value.is_finite() {
                    bail!("step {step}: the generator loss is {value}; stopping before the weights are damaged");
                }
                let mut grads = GradientsParams::from_grads(total.backward(), &self.generator);
                stats.generator_grad_norm = Some(clip_grad_norm(&mut grads, &self.generator, tr.grad_clip));
                let lr = warmup_lr(tr.generator_lr, step, tr.warmup_steps);
                self.generator = self.generator_optim.step(lr, self.generator.clone(), grads);
            }
            generated = Some((x.detach(), labels));
            if let (Some(ema), Some(decay)) = (self.generator_ema.take(), tr.ema_decay) {
                self.generator_ema = Some(ema_update(ema, &self.generator, decay));
            }
        }

        // 2. Fake score: denoise the generator's current outputs.
        let (x, labels) = match generated {
            Some(g) => g,
            None => {
                let (z, labels) = self.noise_batch(&mut rng, bs, &self.device);
                let x = generate(&self.generator.valid(), z, labels.clone(), sigma_g);
                (Tensor::from_inner(x), labels.map(Tensor::from_inner))
            }
        };
        let sigma = self.sigma_batch(&mut rng, bs, (0, self.sigmas.len()), &self.ad);
        let noise = Tensor::<4>::from_data(TensorData::new(normals(&mut rng, bs * c * h * w), [bs, c, h, w]), &self.ad);
        let fake = &self.fake;
        let (loss, _) = fake_score_loss(x, sigma, noise, fake.sigma_data(), |x_t, s| fake.forward(x_t, s, labels.clone()));
        stats.fake_loss = loss.clone().into_scalar::<f64>();
        if !stats.fake_loss.is_finite() {
            bail!("step {step}: the fake-score loss is {}; stopping before the weights are damaged", stats.fake_loss);
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.fake);
        stats.fake_grad_norm = clip_grad_norm(&mut grads, &self.fake, tr.grad_clip);
        let lr = warmup_lr(tr.fake_lr, step, tr.warmup_steps);
        self.fake = self.fake_optim.step(lr, self.fake.clone(), grads);
        Ok(stats)
    }

    /// The generator to sample from: its EMA when kept.
    pub fn sampling_generator(&self) -> EdmPrecond {
        self.generator_ema.clone().unwrap_or_else(|| self.generator.valid())
    }

    fn save(&self, dir: &Path, step: usize) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            self.generator.save(&tmp.join("generator.safetensors"))?;
            self.fake.save(&tmp.join("fake.safetensors"))?;
            if let Some(ema) = &self.generator_ema {
                ema.save(&tmp.join("generator_ema.safetensors"))?;
            }
            for (name, opt) in [("generator", &self.generator_optim), ("fake", &self.fake_optim)] {
                let p = tmp.join(format!("{name}_optim.bpk"));
                opt.save(&p).map_err(|e| anyhow::anyhow!("{}: {e:?}", p.display()))?;
            }
            std::fs::write(tmp.join("state.json"), serde_json::json!({ "step": step }).to_string())?;
            Ok(())
        })
    }
}

/// One-step samples of `generator` for seeds `seed..seed+n` (host, [n, C, H, W]).
pub fn one_step_samples(generator: &EdmPrecond, device: &Device, n: usize, seed: u64, sigma: f64) -> HostTensor {
    let seeds: Vec<u64> = (0..n as u64).map(|i| seed + i).collect();
    let (z, labels) = latents_from_seeds(&seeds, generator.image_shape(), generator.label_dim(), None);
    let x = generate(generator, z.to_tensor(device), labels.map(|l| l.to_tensor(device)), sigma);
    HostTensor::from_tensor(x)
}

pub struct DistillRun {
    pub generator: PathBuf,
    pub eval: Option<ToyEval>,
}

/// The config a run must keep to be resumed.
fn resume_key(cfg: &DistillConfig) -> DistillConfig {
    let mut c = cfg.clone();
    c.train.total_steps = 0;
    c.train.log_every = 0;
    c.train.checkpoint_every = 0;
    c.eval = DistillEvalConfig::default();
    c.device = Backend::Cpu;
    c.out_dir = PathBuf::new();
    c
}

pub fn distill(cfg: &DistillConfig, show_progress: bool) -> Result<DistillRun> {
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let saved = out.join("config.toml");
    let previous = if saved.exists() { Some(DistillConfig::from_file(&saved)?) } else { None };
    guard_config(&saved, cfg, previous, resume_key)?;
    let ckpt = out.join("checkpoint");
    recover(&ckpt)?;
    let (mut d, start) = if ckpt.join("state.json").exists() {
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json"))?)?;
        let step = state["step"].as_u64().context("checkpoint/state.json: no step")? as usize;
        eprintln!("resuming {} from step {step}", out.display());
        (Distiller::new(cfg, Some(&ckpt))?, step)
    } else {
        (Distiller::new(cfg, None)?, 0)
    };
    let metrics = out.join("metrics.jsonl");
    truncate_jsonl(&metrics, start)?;
    eprintln!(
        "distilling {} into a one-step generator on {} (dm weight {}, regression {:?} x {}, {} fake update(s) per generator update)",
        cfg.teacher.weights.display(),
        cfg.device,
        cfg.loss.dm_weight,
        cfg.loss.regression,
        cfg.loss.regression_weight,
        cfg.train.fake_updates_per_generator_update
    );
    let tr = &cfg.train;
    let bar = if show_progress { progress(tr.total_steps as u64, "distill") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(start as u64);
    let mut window: Vec<StepStats> = Vec::new();
    let mut t0 = Instant::now();
    for step in start..tr.total_steps {
        window.push(d.step(step)?);
        let done = step + 1;
        bar.inc(1);
        if done % tr.log_every == 0 || done == tr.total_steps {
            let mean = |f: &dyn Fn(&StepStats) -> Option<f64>| {
                let v: Vec<f64> = window.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            let line = serde_json::json!({
                "step": done,
                "dm_loss": mean(&|s| s.dm_loss),
                "regression_loss": mean(&|s| s.regression_loss),
                "fake_loss": mean(&|s| Some(s.fake_loss)),
                "generator_grad_norm": mean(&|s| s.generator_grad_norm),
                "fake_grad_norm": mean(&|s| Some(s.fake_grad_norm)),
                "generator_lr": warmup_lr(tr.generator_lr, step, tr.warmup_steps),
                "fake_lr": warmup_lr(tr.fake_lr, step, tr.warmup_steps),
                "samples_per_s": (window.len() * tr.batch_size) as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            });
            append_jsonl(&metrics, &line)?;
            bar.set_message(format!("distill fake loss {:.4}", mean(&|s| Some(s.fake_loss)).unwrap_or(0.0)));
            window.clear();
            t0 = Instant::now();
        }
        if done % tr.checkpoint_every == 0 || done == tr.total_steps {
            d.save(&ckpt, done)?;
        }
    }
    bar.finish_and_clear();
    let generator = d.sampling_generator();
    let path = out.join("generator.safetensors");
    generator.save(&path)?;
    eprintln!("one-step generator: {} (sample it with `dmd sample --generator {}`)", path.display(), path.display());
    let eval = match cfg.eval.toy {
        Some(kind) => {
            let x = one_step_samples(&generator, &d.device, cfg.eval.num_samples, cfg.eval.seed, cfg.generator.conditioning_sigma);
            let e = toy_eval_of(&x.data, &ToyDistribution::new(kind), cfg.eval.seed, 1);
            write_atomic(&out.join("eval.json"), serde_json::to_string_pretty(&e)?.as_bytes())?;
            eprintln!("{}", e.summary());
            Some(e)
        }
        None => None,
    };
    Ok(DistillRun { generator: path, eval })
}
