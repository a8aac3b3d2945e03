//! `dmd distill` with a Stable Diffusion teacher: DMD / DMD2 on SD's latents, from a TOML
//! config with an `[sd]` section (see experiments/configs/sd/).
//!
//! The generator is a copy of the teacher's UNet run once at t = 999 from pure noise, its
//! epsilon turned into x_0. The real score is the frozen teacher with classifier-free guidance,
//! the fake score an unguided copy trained with the epsilon MSE on the generator's latents.
//! The distribution-matching loss is the one of the EDM path (`dmd_losses::dmd`): in EDM's
//! terms x_t / sqrt(a_t) = x_0 + sigma_t eps, so the UNet is the denoiser
//! D(x; sigma_t) = x - sigma_t eps(sqrt(a_t) x, t). DMD's regression compares the generator
//! with guided teacher samples (PNDM) after VAE decoding; DMD2's GAN head reads the fake
//! score's mid-block. One training step is [`TextDistiller::step`], top to bottom.

use crate::checkpoint::{load_optimizer, guard_config, read_state, read_toml, recover, truncate_jsonl, write_dir_atomically, NonFiniteGuard};
use crate::device::Backend;
use crate::parallel::{rows, run_replicas, Backprop, Replica, Shards};
use crate::distill::{add_stat, add_weighted, fake_update, generator_update, run_steps, sum_stats, DistillTrainConfig, Gan, StepRunner, StepStats};
use crate::ema::ema_update;
use crate::optim::{warmup_lr, Optim};
use crate::output::grid_png;
use crate::sample::{progress, take_rows};
use crate::teacher::{normals, step_seed};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dmd_datasets::prompts::PromptSet;
use dmd_losses::dmd::{weighted_distribution_matching_loss, DmWeighting};
use dmd_losses::gan::{discriminator_gan_loss, generator_gan_loss};
use dmd_losses::regression::{l2, lpips, pseudo_huber, Regression};
use dmd_models::sd::pipeline::{add_noise, eps_to_x0, guided_eps, StableDiffusion};
use dmd_models::sd::scheduler::SchedulerKind;
use dmd_models::sd::unet::UNet2DCondition;
use dmd_models::weights::{assign_ids, load_named, named_tensors, write_atomic, HostTensor, NamedTensors};
use serde::Deserializer;
use dmd_models::{GanHead, Lpips};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The teacher: a diffusers Stable Diffusion folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdTeacherSpec {
    /// Folder with `tokenizer/`, `text_encoder/`, `unet/`, `vae/` (and `scheduler/`).
    pub dir: PathBuf,
    /// Classifier-free guidance of the real score: DMD's LAION-6.25 setting 3, its LAION-6
    /// setting 8, DMD2 1.75. The fake score is never guided.
    pub guidance_scale: f64,
    /// The generator's timestep (DMD/DMD2: 999, pure noise in).
    pub generator_timestep: usize,
    /// The distribution-matching loss draws timesteps from [min, max] * T (DMD2: 2%, 98%).
    pub min_step_percent: f64,
    pub max_step_percent: f64,
}

impl Default for SdTeacherSpec {
    fn default() -> Self {
        Self { dir: PathBuf::new(), guidance_scale: 3.0, generator_timestep: 999, min_step_percent: 0.02, max_step_percent: 0.98 }
    }
}

/// How the regression loss sees the generator's latents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegressionDecoder {
    /// SD's own VAE decoder (DMD decodes with a tiny VAE to save memory; any diffusers
    /// `AutoencoderKL` folder can stand in through `loss.regression_vae`).
    #[default]
    Vae,
    /// Compare latents directly (no decoding; not with LPIPS).
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextLossConfig {
    pub dm_weight: f64,
    pub dm_weighting: DmWeighting,
    /// DMD: LPIPS on decoded images, weight 0.25.
    pub regression: Regression,
    pub regression_weight: f64,
    pub regression_decoder: RegressionDecoder,
    /// A VAE folder for the regression's decoder instead of the teacher's `vae/`.
    pub regression_vae: Option<PathBuf>,
    pub lpips_vgg: Option<PathBuf>,
    pub lpips_heads: Option<PathBuf>,
    /// DMD2's GAN on the fake score's mid-block (SD v1.5: 1e-3 and 1e-2).
    pub gan_generator_weight: f64,
    pub gan_discriminator_weight: f64,
    /// Latents reach the classifier noised to a timestep in [0, this).
    pub gan_max_timestep: usize,
}

impl Default for TextLossConfig {
    fn default() -> Self {
        Self {
            dm_weight: 1.0,
            dm_weighting: DmWeighting::Dmd,
            regression: Regression::None,
            regression_weight: 0.25,
            regression_decoder: RegressionDecoder::Vae,
            regression_vae: None,
            lpips_vgg: None,
            lpips_heads: None,
            gan_generator_weight: 0.0,
            gan_discriminator_weight: 0.0,
            gan_max_timestep: 1000,
        }
    }
}

impl TextLossConfig {
    fn gan(&self) -> bool {
        self.gan_generator_weight > 0.0 || self.gan_discriminator_weight > 0.0
    }
    fn regression_on(&self) -> bool {
        self.regression != Regression::None && self.regression_weight > 0.0
    }
}

/// Teacher pairs (noise, prompt) -> guided teacher sample, made once at the start of a run
/// and kept in `OUT/pairs.safetensors`: DMD's regression targets, and the "real" latents of
/// DMD2's GAN classifier (real-image latents are not supported yet).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextPairsConfig {
    pub num_pairs: usize,
    pub scheduler: SchedulerKind,
    pub steps: usize,
    /// Guidance of the teacher's sampler (default: the real score's).
    pub guidance_scale: Option<f64>,
    pub seed: u64,
    pub batch_size: usize,
}

impl Default for TextPairsConfig {
    fn default() -> Self {
        Self { num_pairs: 0, scheduler: SchedulerKind::Pndm, steps: 50, guidance_scale: None, seed: 2_000_000, batch_size: 8 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextEvalConfig {
    /// Prompts of the sample grids (default: the first 4 built-in prompts).
    pub prompts: Vec<String>,
    pub seed: u64,
}

impl Default for TextEvalConfig {
    fn default() -> Self {
        Self { prompts: Vec::new(), seed: 1_000_000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextDistillConfig {
    pub out_dir: PathBuf,
    #[serde(default)]
    pub device: Backend,
    pub sd: SdTeacherSpec,
    /// Prompt file (one per line, `#` comments); default: the built-in prompt set.
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    #[serde(default)]
    pub loss: TextLossConfig,
    #[serde(default)]
    pub pairs: TextPairsConfig,
    #[serde(default)]
    pub train: TextTrainConfig,
    #[serde(default)]
    pub eval: TextEvalConfig,
}

/// The distillation's `[train]` settings with SD's defaults where a key is not given: DMD's
/// SD v1.5 learning rate (1e-5 for both networks) and batch 4 per step on one device.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct TextTrainConfig(pub DistillTrainConfig);

impl Default for TextTrainConfig {
    fn default() -> Self {
        Self(DistillTrainConfig { generator_lr: 1e-5, fake_lr: 1e-5, batch_size: 4, regression_batch_size: 4, ..DistillTrainConfig::default() })
    }
}

impl<'de> Deserialize<'de> for TextTrainConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let given = toml::Table::deserialize(d)?;
        let mut merged = toml::Table::try_from(Self::default().0).map_err(D::Error::custom)?;
        merged.extend(given);
        merged.try_into().map(Self).map_err(D::Error::custom)
    }
}

impl std::ops::Deref for TextTrainConfig {
    type Target = DistillTrainConfig;
    fn deref(&self) -> &DistillTrainConfig {
        &self.0
    }
}

impl std::ops::DerefMut for TextTrainConfig {
    fn deref_mut(&mut self) -> &mut DistillTrainConfig {
        &mut self.0
    }
}

/// Whether a config file is a text-to-image one (it has an `[sd]` section).
pub fn is_text_config(path: &Path) -> bool {
    std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok()).is_some_and(|t| t.contains_key("sd"))
}

impl TextDistillConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_toml(path)?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        if self.train.bf16_body {
            bail!("train.bf16_body: not supported for Stable Diffusion yet (the UNet runs in float32)");
        }
        let s = &self.sd;
        if s.dir.as_os_str().is_empty() {
            bail!("sd.dir: missing (the Stable Diffusion folder: tokenizer/, text_encoder/, unet/, vae/)");
        }
        if !(s.guidance_scale >= 1.0 && s.guidance_scale.is_finite()) {
            bail!("sd.guidance_scale must be at least 1, got {}", s.guidance_scale);
        }
        if !(0.0 <= s.min_step_percent && s.min_step_percent < s.max_step_percent && s.max_step_percent <= 1.0) {
            bail!("need 0 <= sd.min_step_percent < sd.max_step_percent <= 1, got {} and {}", s.min_step_percent, s.max_step_percent);
        }
        let l = &self.loss;
        if [l.dm_weight, l.regression_weight, l.gan_generator_weight, l.gan_discriminator_weight].iter().any(|w| !(*w >= 0.0 && w.is_finite())) {
            bail!("loss: weights must be finite and not negative");
        }
        if l.regression_on() {
            if self.pairs.num_pairs == 0 {
                bail!("loss.regression = {:?} needs teacher pairs: set pairs.num_pairs", l.regression);
            }
            let parts = self.train.micro_batches * self.train.devices;
            if self.train.regression_batch_size.min(self.pairs.num_pairs) < parts {
                bail!("train.regression_batch_size and pairs.num_pairs must be at least micro_batches x devices ({parts}): each part needs a pair");
            }
            if l.regression == Regression::Lpips {
                if l.regression_decoder == RegressionDecoder::None {
                    bail!("loss.regression = \"lpips\" compares images: loss.regression_decoder cannot be \"none\"");
                }
                if l.lpips_vgg.is_none() || l.lpips_heads.is_none() {
                    bail!("loss.regression = \"lpips\" needs loss.lpips_vgg and loss.lpips_heads (see tools/lpips_to_safetensors.py)");
                }
            }
        }
        if l.regression_vae.is_some() && l.regression_decoder == RegressionDecoder::None {
            bail!("loss.regression_vae is set but loss.regression_decoder = \"none\" compares latents");
        }
        if l.gan() && l.gan_max_timestep == 0 {
            bail!("loss.gan_max_timestep must be positive (latents reach the classifier at a timestep below it)");
        }
        if l.gan() && self.pairs.num_pairs == 0 {
            bail!("loss.gan_*_weight > 0 needs real latents: set pairs.num_pairs (teacher samples stand in for real images)");
        }
        let p = &self.pairs;
        if p.num_pairs > 0 && (p.steps == 0 || p.steps > 1000 || p.batch_size == 0) {
            bail!("pairs.steps must lie in [1, 1000] and pairs.batch_size be positive");
        }
        if p.guidance_scale.is_some_and(|g| !(g >= 1.0 && g.is_finite())) {
            bail!("pairs.guidance_scale must be at least 1");
        }
        Ok(())
    }
}

/// The noise of DMD2's realism logits for a batch (see [`TextDistiller::realism_draw`]).
struct RealismDraw {
    tf: Tensor<1>,
    a: Tensor<1>,
    noise: Tensor<4>,
}

impl RealismDraw {
    fn rows(&self, r: &std::ops::Range<usize>) -> RealismDraw {
        RealismDraw { tf: rows(&self.tf, r), a: rows(&self.a, r), noise: rows(&self.noise, r) }
    }
}

/// Per-sample float tensor on `device`.
fn vector(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// The one-step generator: x_0 from its epsilon at timestep `t` on pure noise `z`.
pub fn generate(generator: &UNet2DCondition, z: Tensor<4>, context: Tensor<3>, t: usize, alpha_t: f64) -> Tensor<4> {
    let (n, device) = (z.dims()[0], z.device());
    let eps = generator.forward(z.clone(), Tensor::full([n], t as f64, &device), context);
    eps_to_x0(z, eps, Tensor::full([n], alpha_t, &device))
}

/// A generator folder's timestep (`dmd_generator.json` beside the UNet; 999 when absent).
pub fn generator_timestep(dir: &Path) -> Result<usize> {
    let p = dir.join("dmd_generator.json");
    if !p.exists() {
        return Ok(999);
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| p.display().to_string())?)
        .with_context(|| p.display().to_string())?;
    v["timestep"].as_u64().map(|t| t as usize).with_context(|| format!("{}: no integer `timestep`", p.display()))
}

/// Writes a generator UNet folder that `dmd txt2img --generator` reads.
pub fn save_generator(generator: &UNet2DCondition, dir: &Path, timestep: usize) -> Result<()> {
    generator.save(dir)?;
    write_atomic(&dir.join("dmd_generator.json"), serde_json::json!({ "timestep": timestep }).to_string().as_bytes())?;
    Ok(())
}

/// The real score: the frozen teacher UNet with classifier-free guidance.
pub struct RealScoreSd<'a> {
    pub unet: &'a UNet2DCondition,
    pub uncond: Tensor<3>,
    pub guidance: f64,
}

/// DMD's distribution-matching loss of generator latents `x` (autodiff device) at timesteps
/// `t` with `noise`: the EDM-form loss of `dmd_losses::dmd` with each UNet as the denoiser
/// D(y; sigma_t) = y - sigma_t eps(sqrt(a_t) y, t), y = x + sigma_t noise = x_t / sqrt(a_t).
/// `fake` and `context` live on the plain device.
#[allow(clippy::too_many_arguments)]
pub fn sd_distribution_matching_loss(
    x: Tensor<4>,
    t: &[usize],
    noise: Tensor<4>,
    alphas: &[f64],
    weighting: DmWeighting,
    real: &RealScoreSd,
    fake: &UNet2DCondition,
    context: Tensor<3>,
) -> dmd_losses::dmd::DmLoss {
    let device = context.device();
    let ad = x.device();
    let sigma = vector(t.iter().map(|&t| ((1.0 - alphas[t]) / alphas[t]).sqrt() as f32).collect(), &ad);
    let tf = vector(t.iter().map(|&t| t as f32).collect(), &device);
    let sqrt_a = vector(t.iter().map(|&t| alphas[t].sqrt() as f32).collect(), &device).reshape([-1, 1, 1, 1]);
    let denoise = |eps_of: &dyn Fn(Tensor<4>) -> Tensor<4>, y: Tensor<4>, s: Tensor<1>| {
        let x_t = y.clone() * sqrt_a.clone();
        y - eps_of(x_t) * s.reshape([-1, 1, 1, 1])
    };
    let real_eps = |x_t: Tensor<4>| guided_eps(real.unet, x_t, tf.clone(), context.clone(), real.uncond.clone(), real.guidance);
    let fake_eps = |x_t: Tensor<4>| fake.forward(x_t, tf.clone(), context.clone());
    weighted_distribution_matching_loss(
        x,
        sigma,
        noise,
        weighting,
        |y, s| Tensor::from_inner(denoise(&real_eps, y.inner(), s.inner())),
        |y, s| Tensor::from_inner(denoise(&fake_eps, y.inner(), s.inner())),
    )
}

/// Teacher pairs in memory: noise, teacher latents, their prompts.
pub struct TextPairs {
    pub noise: HostTensor,
    pub latents: HostTensor,
    pub prompts: Vec<String>,
}

impl TextPairs {
    /// What made a set of pairs (besides the prompts, stored with them): a change makes them
    /// stale.
    fn recipe(cfg: &TextPairsConfig, guidance: f64, teacher: &Path) -> String {
        serde_json::json!({
            "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance_scale": guidance, "seed": cfg.seed, "teacher": teacher.display().to_string(),
        })
        .to_string()
    }

    /// Reads the pairs of `path`, refusing them (name the difference) unless `recipe` and the
    /// prompts the config would draw (`prompts`) made them.
    fn read(path: &Path, cfg: &TextPairsConfig, shape: [usize; 3], recipe: &str, prompts: &[String]) -> Result<Self> {
        let named = NamedTensors::read(path)?;
        let meta = NamedTensors::read_metadata(path)?;
        let made_by = meta.get("recipe").map(String::as_str).unwrap_or("unknown");
        if made_by != recipe {
            bail!("{}: made with {made_by}, this config asks for {recipe} (delete the file to remake the pairs)", path.display());
        }
        let get = |k: &str| named.get(k).cloned().with_context(|| format!("{}: tensor `{k}` missing", path.display()));
        let (noise, latents) = (get("noise")?, get("latents")?);
        let want = [cfg.num_pairs, shape[0], shape[1], shape[2]];
        if noise.shape != want || latents.shape != want {
            bail!("{}: pairs of shape {:?}, expected {want:?} (delete it to remake the pairs)", path.display(), latents.shape);
        }
        let want_prompts = prompts;
        let prompts: Vec<String> = serde_json::from_str(meta.get("prompts").map(String::as_str).unwrap_or(""))
            .with_context(|| format!("{}: metadata `prompts` is not a list of strings", path.display()))?;
        if prompts != want_prompts {
            bail!("{}: made for other prompts than this config's (prompt file or pairs.seed changed; delete the file to remake the pairs)", path.display());
        }
        Ok(Self { noise, latents, prompts })
    }

    /// The guided teacher's samples for `num_pairs` (seeded noise, prompt) pairs.
    fn make(sd: &StableDiffusion, all_prompts: &[String], cfg: &TextPairsConfig, guidance: f64, show_progress: bool) -> Result<Self> {
        let shape = sd.latent_shape();
        let per = shape.iter().product::<usize>();
        let uncond = sd.encode_prompts(&[String::new()]);
        let bar = if show_progress { progress(cfg.num_pairs as u64, "teacher pairs") } else { indicatif::ProgressBar::hidden() };
        let (mut noise, mut latents) = (Vec::with_capacity(cfg.num_pairs * per), Vec::with_capacity(cfg.num_pairs * per));
        for start in (0..cfg.num_pairs).step_by(cfg.batch_size) {
            let end = (start + cfg.batch_size).min(cfg.num_pairs);
            let mut z = Vec::with_capacity((end - start) * per);
            for i in start..end {
                z.extend(normals(&mut StdRng::seed_from_u64(step_seed(cfg.seed, i as u64, 30)), per));
            }
            let zt = Tensor::<4>::from_data(TensorData::new(z.clone(), [end - start, shape[0], shape[1], shape[2]]), &sd.device);
            let cond = sd.encode_prompts(&all_prompts[start..end]);
            let y = sd.sample_latents(cfg.scheduler, cfg.steps, guidance, zt, cond, uncond.clone(), |_, _| {})?;
            noise.extend(z);
            latents.extend(HostTensor::from_tensor(y).data);
            bar.inc((end - start) as u64);
        }
        bar.finish_and_clear();
        let s = vec![cfg.num_pairs, shape[0], shape[1], shape[2]];
        Ok(Self { noise: HostTensor::new(s.clone(), noise), latents: HostTensor::new(s, latents), prompts: all_prompts.to_vec() })
    }

    fn write(&self, path: &Path, recipe: &str) -> Result<()> {
        let mut named = NamedTensors::default();
        named.metadata.insert("recipe".into(), recipe.into());
        named.insert("noise", self.noise.clone());
        named.insert("latents", self.latents.clone());
        named.metadata.insert("prompts".into(), serde_json::to_string(&self.prompts)?);
        named.write(path)?;
        Ok(())
    }
}


/// Training state of a text-to-image distillation run.
pub struct TextDistiller {
    pub cfg: TextDistillConfig,
    pub device: Device,
    pub ad: Device,
    /// The teacher (frozen): tokenizer, text encoder, real-score UNet, VAE, schedule.
    pub sd: StableDiffusion,
    pub generator: UNet2DCondition,
    pub fake: UNet2DCondition,
    pub generator_ema: Option<UNet2DCondition>,
    pub generator_optim: Optim,
    pub fake_optim: Optim,
    pub gan: Option<Gan>,
    pub prompts: PromptSet,
    pub pairs: Option<TextPairs>,
    /// The regression's decoder (frozen, on the autodiff device: gradients reach the latents).
    pub decoder: Option<dmd_models::sd::vae::AutoencoderKL>,
    pub lpips: Option<Lpips>,
    pub uncond: Tensor<3>,
    pub alphas: Vec<f64>,
    pub shape: [usize; 3],
    /// This replica's place in a data-parallel run.
    pub replica: Replica,
}

impl TextDistiller {
    pub fn new(cfg: &TextDistillConfig, checkpoint: Option<&Path>, show_progress: bool) -> Result<Self> {
        Self::replica(cfg, checkpoint, show_progress, Replica::single(), cfg.device.device()?)
    }

    /// [`TextDistiller::new`] for `replica` of a data-parallel run, on `device` (the main
    /// replica makes the teacher pairs when missing; build it before the others).
    pub fn replica(cfg: &TextDistillConfig, checkpoint: Option<&Path>, show_progress: bool, replica: Replica, device: Device) -> Result<Self> {
        let ad = device.clone().autodiff();
        let dir = &cfg.sd.dir;
        let sd = StableDiffusion::load(dir, &device).context("sd.dir")?;
        let shape = sd.latent_shape();
        let alphas = sd.scheduler.alphas_cumprod();
        if cfg.sd.generator_timestep >= alphas.len() {
            bail!("sd.generator_timestep = {} is not below the schedule's {} timesteps", cfg.sd.generator_timestep, alphas.len());
        }
        if cfg.loss.gan_max_timestep > alphas.len() {
            bail!("loss.gan_max_timestep = {} exceeds the schedule's {} timesteps", cfg.loss.gan_max_timestep, alphas.len());
        }
        let prompts = match &cfg.prompts {
            Some(p) => PromptSet::from_file(p)?,
            None => PromptSet::builtin(),
        };
        let tr = &cfg.train;
        let adamw = || crate::optim::adamw(tr.adam_betas[0] as f32, tr.adam_betas[1] as f32, 1e-8, tr.weight_decay as f32);
        let load_optim = |dir: &Path, name: &str| {
            let p = dir.join(format!("{name}_optim.bpk"));
            load_optimizer(adamw(), &p)
        };
        // Each trained network is its own load with ids of its own namespace: Burn's clone()
        // would share parameters, gradients and optimiser state.
        let unet = |path: &Path, dev: &Device, ns: &str| -> Result<UNet2DCondition> {
            let net = UNet2DCondition::load_in_namespace(path, dev, ns)?;
            sd.check_unet(&net, &path.join("config.json"))?;
            Ok(net)
        };
        let (generator, fake, generator_ema, generator_optim, fake_optim) = match checkpoint {
            Some(ck) => {
                let ema = match tr.ema_decay {
                    Some(_) => Some(unet(&ck.join("generator_ema"), &device, "generator_ema")?),
                    None => None,
                };
                (unet(&ck.join("generator"), &ad, "generator")?, unet(&ck.join("fake"), &ad, "fake")?, ema, load_optim(ck, "generator")?, load_optim(ck, "fake")?)
            }
            None => {
                let teacher_unet = dir.join("unet");
                let ema = tr.ema_decay.map(|_| unet(&teacher_unet, &device, "generator_ema")).transpose()?;
                (unet(&teacher_unet, &ad, "generator")?, unet(&teacher_unet, &ad, "fake")?, ema, adamw(), adamw())
            }
        };
        let l = &cfg.loss;
        let gan = if l.gan() {
            let channels = fake.mid_channels();
            let res = shape[1] >> (fake.config().block_out_channels.len() - 1);
            let head = match checkpoint {
                Some(ck) => {
                    let p = ck.join("gan_head.safetensors");
                    load_named(GanHead::placeholder(channels, res, &ad), &NamedTensors::read(&p)?, &p.display().to_string(), "gan_head")?
                }
                None => assign_ids(GanHead::new(channels, res, &ad, step_seed(tr.seed, 0, 32)), "gan_head"),
            };
            let optim = match checkpoint {
                Some(ck) => load_optim(ck, "gan_head")?,
                None => adamw(),
            };
            Some(Gan { head, optim })
        } else {
            None
        };
        let decoder = match (l.regression_on(), l.regression_decoder, &l.regression_vae) {
            (true, RegressionDecoder::Vae, Some(vae)) => Some(dmd_models::sd::vae::AutoencoderKL::load(vae, &ad)?),
            (true, RegressionDecoder::Vae, None) => Some(dmd_models::sd::vae::AutoencoderKL::load(&dir.join("vae"), &ad)?),
            _ => None,
        };
        let lpips = match (l.regression_on() && l.regression == Regression::Lpips, &l.lpips_vgg, &l.lpips_heads) {
            (true, Some(vgg), Some(heads)) => Some(Lpips::load(vgg, heads, &ad)?),
            _ => None,
        };
        // Made last: hours of teacher sampling at full size, after every other input loaded.
        let pairs = if cfg.pairs.num_pairs > 0 && (l.regression_on() || l.gan()) {
            let path = cfg.out_dir.join("pairs.safetensors");
            let guidance = cfg.pairs.guidance_scale.unwrap_or(cfg.sd.guidance_scale);
            let recipe = TextPairs::recipe(&cfg.pairs, guidance, dir);
            let wanted = prompts.batch(0, cfg.pairs.seed, cfg.pairs.num_pairs);
            Some(if path.exists() {
                TextPairs::read(&path, &cfg.pairs, shape, &recipe, &wanted)?
            } else {
                let pairs = TextPairs::make(&sd, &wanted, &cfg.pairs, guidance, show_progress)?;
                std::fs::create_dir_all(&cfg.out_dir).with_context(|| cfg.out_dir.display().to_string())?;
                pairs.write(&path, &recipe)?;
                pairs
            })
        } else {
            None
        };
        let uncond = sd.encode_prompts(&[String::new()]);
        Ok(Self {
            cfg: cfg.clone(),
            device,
            ad,
            sd,
            generator,
            fake,
            generator_ema,
            generator_optim,
            fake_optim,
            gan,
            prompts,
            pairs,
            decoder,
            lpips,
            uncond,
            alphas,
            shape,
            replica,
        })
    }

    fn normal(&self, rng: &mut StdRng, n: usize) -> Tensor<4> {
        let [c, h, w] = self.shape;
        Tensor::from_data(TensorData::new(normals(rng, n * c * h * w), [n, c, h, w]), &self.ad)
    }

    /// `n` timesteps drawn uniformly from [lo, hi): as floats for the UNet, and their a_t.
    fn timesteps(&self, rng: &mut StdRng, n: usize, lo: usize, hi: usize) -> (Vec<usize>, Tensor<1>, Tensor<1>) {
        let t: Vec<usize> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        let tf = vector(t.iter().map(|&t| t as f32).collect(), &self.ad);
        let a = vector(t.iter().map(|&t| self.alphas[t] as f32).collect(), &self.ad);
        (t, tf, a)
    }

    /// The text embeddings of `prompts` on the autodiff device (a constant there).
    fn context(&self, prompts: &[String]) -> Tensor<3> {
        Tensor::from_inner(self.sd.encode_prompts(prompts))
    }

    /// Images the regression compares: decoded (VAE) or the latents themselves.
    fn regression_view(&self, latents: Tensor<4>) -> Tensor<4> {
        match &self.decoder {
            Some(vae) => vae.decode(latents.div_scalar(vae.scaling_factor())),
            None => latents,
        }
    }

    /// The noise of DMD2's realism logits for `n` latents: a timestep below
    /// `gan_max_timestep` and Gaussian noise.
    fn realism_draw(&self, rng: &mut StdRng, n: usize) -> RealismDraw {
        let (_, tf, a) = self.timesteps(rng, n, 0, self.cfg.loss.gan_max_timestep.max(1));
        RealismDraw { tf, a, noise: self.normal(rng, n) }
    }

    /// DMD2's realism logits of latents `x`, noised by `draw` and read from `fake`'s mid-block
    /// by `head`.
    fn realism_logits(fake: &UNet2DCondition, head: &GanHead, draw: RealismDraw, x: Tensor<4>, context: Tensor<3>) -> Tensor<1> {
        let x_t = add_noise(x, draw.noise, draw.a);
        head.forward(fake.forward_with_mid(x_t, draw.tf, context).1)
    }

    /// One training step: a generator update (every `fake_updates_per_generator_update`-th
    /// step), then a fake-score (and GAN classifier) update. All randomness comes from (seed,
    /// step) and is drawn for the whole batch before any network runs; the losses then run
    /// over this replica's parts of it (see [`crate::parallel`]).
    pub fn step(&mut self, step: usize) -> Result<StepStats> {
        let cfg = self.cfg.clone();
        let (tr, l) = (&cfg.train, &cfg.loss);
        let mut rng = StdRng::seed_from_u64(step_seed(tr.seed, step as u64, 20));
        self.ad.seed(step_seed(tr.seed, step as u64, 21));
        let bs = tr.batch_size;
        let (parts, mine) = self.replica.parts(bs, tr.micro_batches);
        let (t_gen, alpha_gen) = (cfg.sd.generator_timestep, self.alphas[cfg.sd.generator_timestep]);
        let prompts = self.prompts.batch(step as u64, tr.seed, bs);
        let context = self.context(&prompts);
        let mut stats = StepStats::default();

        // 1. Generator: one step from pure noise, then distribution matching (guided real vs
        //    fake score), GAN, and regression on teacher pairs.
        let z = self.normal(&mut rng, bs);
        let mut generated: Vec<Option<Tensor<4>>> = Vec::new();
        if step % tr.fake_updates_per_generator_update == 0 {
            let dm_draw = (l.dm_weight > 0.0).then(|| {
                let t_max = self.alphas.len();
                let lo = (cfg.sd.min_step_percent * t_max as f64) as usize;
                let hi = ((cfg.sd.max_step_percent * t_max as f64) as usize + 1).min(t_max).max(lo + 1);
                let (t, _, _) = self.timesteps(&mut rng, bs, lo, hi);
                (t, self.normal(&mut rng, bs))
            });
            let gan_draw = (self.gan.is_some() && l.gan_generator_weight > 0.0).then(|| self.realism_draw(&mut rng, bs));
            let pairs = self.pairs.as_ref().filter(|_| l.regression_on());
            let reg_idx: Vec<usize> = match pairs {
                Some(p) => (0..tr.regression_batch_size.min(p.prompts.len())).map(|_| rng.random_range(0..p.prompts.len())).collect(),
                None => Vec::new(),
            };
            let reg_parts = Shards::new(reg_idx.len(), parts.count);
            let real = RealScoreSd { unet: &self.sd.unet, uncond: self.uncond.clone(), guidance: cfg.sd.guidance_scale };
            let mut bp = Backprop::default();
            for part in mine.clone() {
                let (r, w) = (parts.rows(part), parts.weight(part));
                let ctx = rows(&context, &r);
                let x = generate(&self.generator, rows(&z, &r), ctx.clone(), t_gen, alpha_gen);
                let mut total: Option<Tensor<1>> = None;
                if let Some((t, noise)) = &dm_draw {
                    let dm = sd_distribution_matching_loss(x.clone(), &t[r.clone()], rows(noise, &r), &self.alphas, l.dm_weighting, &real, &self.fake.valid(), ctx.clone().inner());
                    add_stat(&mut stats.dm_loss, w * dm.loss.clone().into_scalar::<f64>());
                    add_weighted(&mut total, dm.loss, w * l.dm_weight);
                }
                if let (Some(gan), Some(draw)) = (&self.gan, &gan_draw) {
                    // Gradients flow through the frozen fake score and head into the latents only.
                    let logits = Self::realism_logits(&self.fake.clone().no_grad(), &gan.head.clone().no_grad(), draw.rows(&r), x.clone(), ctx.clone());
                    let loss = generator_gan_loss(logits);
                    add_stat(&mut stats.gan_generator_loss, w * loss.clone().into_scalar::<f64>());
                    add_weighted(&mut total, loss, w * l.gan_generator_weight);
                }
                let reg_rows = &reg_idx[reg_parts.rows(part)];
                if let (Some(pairs), false) = (pairs, reg_rows.is_empty()) {
                    let w = reg_parts.weight(part);
                    let z_ref = take_rows(&pairs.noise, reg_rows).to_tensor::<4>(&self.ad);
                    let y_ref = take_rows(&pairs.latents, reg_rows).to_tensor::<4>(&self.ad);
                    let ctx_ref = self.context(&reg_rows.iter().map(|&i| pairs.prompts[i].clone()).collect::<Vec<_>>());
                    let g_ref = generate(&self.generator, z_ref, ctx_ref, t_gen, alpha_gen);
                    let (g_img, y_img) = (self.regression_view(g_ref), self.regression_view(y_ref).detach());
                    let reg = match (l.regression, &self.lpips) {
                        (Regression::L2, _) => l2(g_img, y_img),
                        (Regression::PseudoHuber, _) => pseudo_huber(g_img, y_img),
                        (Regression::Lpips, Some(net)) => lpips(g_img.clamp(-1.0, 1.0), y_img.clamp(-1.0, 1.0), net),
                        (Regression::None | Regression::Lpips, _) => unreachable!("validated"),
                    };
                    add_stat(&mut stats.regression_loss, w * reg.clone().into_scalar::<f64>());
                    add_weighted(&mut total, reg, w * l.regression_weight);
                }
                if let Some(total) = total {
                    bp.add(total, &self.generator, None::<&GanHead>);
                }
                generated.push(Some(x.detach()));
            }
            let has_loss = dm_draw.is_some() || gan_draw.is_some() || !reg_idx.is_empty();
            self.replica.reduce(&mut bp, &self.generator, None::<&GanHead>)?;
            sum_stats(&self.replica, [&mut stats.dm_loss, &mut stats.gan_generator_loss, &mut stats.regression_loss]);
            // A NaN/Inf loss or gradient skips the update (weights, EMA, optimiser untouched).
            let lr = warmup_lr(tr.generator_lr, step, tr.warmup_steps);
            let applied = !has_loss || generator_update(bp, &mut self.generator, &mut self.generator_optim, lr, tr.grad_clip, &mut stats);
            if let (true, Some(ema), Some(decay)) = (applied, self.generator_ema.take(), tr.ema_decay) {
                self.generator_ema = Some(ema_update(ema, &self.generator.valid(), decay));
            }
        }

        // 2. Fake score: epsilon MSE on the generator's latents at a uniform timestep; the GAN
        //    classifier tells teacher latents from the generator's on the mid-block.
        let (_, tf, a) = self.timesteps(&mut rng, bs, 0, self.alphas.len());
        let noise = self.normal(&mut rng, bs);
        let disc_draw = match (&self.gan, &self.pairs, l.gan_discriminator_weight > 0.0) {
            (Some(_), Some(pairs), true) => {
                let idx: Vec<usize> = (0..bs).map(|_| rng.random_range(0..pairs.prompts.len())).collect();
                let real = take_rows(&pairs.latents, &idx).to_tensor::<4>(&self.ad);
                let real_ctx = self.context(&idx.iter().map(|&i| pairs.prompts[i].clone()).collect::<Vec<_>>());
                Some((real, real_ctx, self.realism_draw(&mut rng, bs), self.realism_draw(&mut rng, bs)))
            }
            _ => None,
        };
        let mut bp = Backprop::default();
        for part in mine.clone() {
            let (r, w) = (parts.rows(part), parts.weight(part));
            let ctx = rows(&context, &r);
            let x = match generated.get_mut(part - mine.start) {
                Some(x) => x.take().expect("one output per part"),
                None => Tensor::from_inner(generate(&self.generator.valid(), rows(&z, &r).inner(), ctx.clone().inner(), t_gen, alpha_gen)),
            };
            let noise = rows(&noise, &r);
            let eps = self.fake.forward(add_noise(x.clone(), noise.clone(), rows(&a, &r)), rows(&tf, &r), ctx.clone());
            let mut loss = (eps - noise).square().mean();
            stats.fake_loss += w * loss.clone().into_scalar::<f64>();
            if let (Some(gan), Some((real, real_ctx, real_draw, fake_draw))) = (&self.gan, &disc_draw) {
                let logits_real = Self::realism_logits(&self.fake, &gan.head, real_draw.rows(&r), rows(real, &r), rows(real_ctx, &r));
                let logits_fake = Self::realism_logits(&self.fake, &gan.head, fake_draw.rows(&r), x, ctx);
                let d = discriminator_gan_loss(logits_real, logits_fake);
                add_stat(&mut stats.gan_discriminator_loss, w * d.clone().into_scalar::<f64>());
                loss = loss + d.mul_scalar(l.gan_discriminator_weight);
            }
            bp.add(loss.mul_scalar(w), &self.fake, self.gan.as_ref().map(|g| &g.head));
        }
        self.replica.reduce(&mut bp, &self.fake, self.gan.as_ref().map(|g| &g.head))?;
        let mut fake_loss = Some(stats.fake_loss);
        sum_stats(&self.replica, [&mut fake_loss, &mut stats.gan_discriminator_loss]);
        stats.fake_loss = fake_loss.unwrap_or(0.0);
        let lr = warmup_lr(tr.fake_lr, step, tr.warmup_steps);
        fake_update(bp, &mut self.fake, &mut self.fake_optim, self.gan.as_mut(), lr, tr.grad_clip, &mut stats);
        Ok(stats)
    }

    /// The generator to sample from: its EMA when kept.
    pub fn sampling_generator(&self) -> UNet2DCondition {
        self.generator_ema.clone().unwrap_or_else(|| self.generator.valid())
    }

    /// Decoded one-step samples of the eval prompts (seeds eval.seed + i), as a PNG grid.
    fn preview(&self) -> Result<Vec<u8>> {
        let prompts = eval_prompts(&self.cfg);
        let images = one_step_images(&self.sd, &self.sampling_generator(), &prompts, self.cfg.eval.seed, self.cfg.sd.generator_timestep);
        grid_png(&images)
    }

    fn save(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard) -> Result<()> {
        let tr = &self.cfg.train;
        write_dir_atomically(dir, tr.keep_checkpoints, |tmp| {
            std::fs::write(tmp.join("config.toml"), toml::to_string_pretty(&self.cfg)?)?;
            self.generator.save(&tmp.join("generator"))?;
            self.fake.save(&tmp.join("fake"))?;
            if let Some(ema) = &self.generator_ema {
                ema.save(&tmp.join("generator_ema"))?;
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

impl StepRunner for TextDistiller {
    fn run_step(&mut self, step: usize) -> Result<StepStats> {
        self.step(step)
    }
    fn save_checkpoint(&self, dir: &Path, step: usize, nonfinite: &NonFiniteGuard) -> Result<()> {
        self.save(dir, step, nonfinite)
    }
    fn preview_png(&self) -> Result<Vec<u8>> {
        self.preview()
    }
    fn is_main(&self) -> bool {
        self.replica.is_main()
    }
}

fn eval_prompts(cfg: &TextDistillConfig) -> Vec<String> {
    if cfg.eval.prompts.is_empty() {
        dmd_datasets::prompts::builtin_prompts().into_iter().take(4).collect()
    } else {
        cfg.eval.prompts.clone()
    }
}

/// Seeded standard-normal latents, one image per seed ([n, C, H, W] on `device`).
pub fn seeded_latents(seeds: &[u64], shape: [usize; 3], device: &Device) -> Tensor<4> {
    let per: usize = shape.iter().product();
    let z: Vec<f32> = seeds.iter().flat_map(|&s| normals(&mut StdRng::seed_from_u64(s), per)).collect();
    Tensor::from_data(TensorData::new(z, [seeds.len(), shape[0], shape[1], shape[2]]), device)
}

/// One-step images in [-1, 1] of `generator` for `prompts` (seeds `seed + i`).
pub fn one_step_images(sd: &StableDiffusion, generator: &UNet2DCondition, prompts: &[String], seed: u64, timestep: usize) -> HostTensor {
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|i| seed + i).collect();
    let z = seeded_latents(&seeds, sd.latent_shape(), &sd.device);
    let alpha = sd.scheduler.alphas_cumprod()[timestep];
    let x = generate(generator, z, sd.encode_prompts(prompts), timestep, alpha);
    HostTensor::from_tensor(sd.decode(x))
}

fn resume_key(cfg: &TextDistillConfig) -> TextDistillConfig {
    let mut c = cfg.clone();
    c.train.0 = c.train.resume_key();
    c.eval = TextEvalConfig::default();
    c.device = Backend::Cpu;
    c.out_dir = PathBuf::new();
    c
}

/// Distils (or resumes) the text-to-image run of `cfg`.
pub fn distill(cfg: &TextDistillConfig, show_progress: bool, force_resume: bool) -> Result<PathBuf> {
    let out = &cfg.out_dir;
    let saved = out.join("config.toml");
    let previous = if saved.exists() { Some(TextDistillConfig::from_file(&saved)?) } else { None };
    let existed = out.exists();
    if existed {
        guard_config(&saved, cfg, previous, resume_key, force_resume)?;
    }
    let ckpt = out.join("checkpoint");
    recover(&ckpt)?;
    let resume = ckpt.join("state.json").exists();
    let (start, mut nonfinite) = if resume {
        let (step, state) = read_state(&ckpt)?;
        (step, NonFiniteGuard::resumed(state["skipped_steps"].as_u64().unwrap_or(0)))
    } else {
        (0, NonFiniteGuard::default())
    };
    // A new run checks its inputs (teacher, prompts) before it creates its folder.
    let mut replicas = Replica::group(cfg.device, cfg.train.devices)?;
    let (main, main_device) = replicas.remove(0);
    let from = resume.then_some(ckpt.as_path());
    let mut d = TextDistiller::replica(cfg, from, show_progress, main.clone(), main_device)?;
    if !existed {
        guard_config(&saved, cfg, None, resume_key, force_resume)?;
    }
    if resume {
        eprintln!("resuming {} from step {start}", out.display());
    }
    let metrics = out.join("metrics.jsonl");
    truncate_jsonl(&metrics, start)?;
    let l = &cfg.loss;
    eprintln!(
        "distilling {} (text-to-image, guidance {}) into a one-step generator on {} x {} (dm x {}, regression {:?} x {}, GAN x {}/{}, {} fake update(s) per generator update, {} prompts)",
        cfg.sd.dir.display(),
        cfg.sd.guidance_scale,
        cfg.train.devices,
        cfg.device,
        l.dm_weight,
        l.regression,
        if l.regression_on() { l.regression_weight } else { 0.0 },
        l.gan_generator_weight,
        l.gan_discriminator_weight,
        cfg.train.fake_updates_per_generator_update,
        d.prompts.len()
    );
    // The other replicas, one thread each (after the main one made any missing pairs).
    let guard = nonfinite.clone();
    run_replicas(
        &main,
        || run_steps(&mut d, &cfg.train, start, &mut nonfinite, &ckpt, out, show_progress),
        replicas,
        |r, device| TextDistiller::replica(cfg, from, false, r.clone(), device).and_then(|mut d| run_steps(&mut d, &cfg.train, start, &mut guard.clone(), &ckpt, out, false)),
    )?;
    let path = out.join("generator");
    save_generator(&d.sampling_generator(), &path, cfg.sd.generator_timestep)?;
    eprintln!(
        "one-step generator: {} (generate with `dmd txt2img --teacher {} --generator {} --prompt ...`)",
        path.display(),
        cfg.sd.dir.display(),
        path.display()
    );
    Ok(path)
}
