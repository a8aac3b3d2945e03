//! `dmd train-teacher`: trains an EDM teacher (EDM's loss, Adam, learning-rate ramp-up, EMA)
//! from a TOML config, with checkpoints, exact resume, a progress bar and a metrics log.
//!
//! Every random draw of step `s` comes from generators seeded by (seed, s), so a resumed run
//! repeats the uninterrupted one exactly.

use crate::checkpoint::{load_optimizer, append_jsonl, guard_config, read_toml, recover, run_finished, truncate_jsonl, write_dir_atomically, NonFiniteGuard};
use crate::data::{DataConfig, DataSource};
use crate::device::Backend;
use crate::ema::{ema_beta, ema_update};
use crate::optim::{grad_norm, Optim};
use crate::parallel::{rows, run_replicas, Backprop, Replica};
use crate::metrics::{energy_distance, mode_stats, ModeStats};
use crate::output::{preview_png, scatter_png};
use crate::sample::{progress, seeded_samples};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dmd_datasets::{ToyDistribution, ToyKind};
use dmd_losses::edm::{edm_loss, EdmLossConfig};
use dmd_models::weights::{assign_ids, fork_named, write_atomic};
use dmd_models::{config_path_for, EdmConfig, EdmPrecond, HostTensor, SamplerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Optimisation settings; defaults are EDM's (CIFAR-10 recipe) where EDM has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The global batch of one update.
    pub batch_size: usize,
    /// Run each batch as this many micro-batches, their gradients summed before the update: the
    /// same step to float rounding (dropout masks aside, drawn per micro-batch), in less memory.
    pub micro_batches: usize,
    /// Data-parallel replicas, one per device (CUDA: GPUs 0..devices), each running its share
    /// of the batch (as `micro_batches` parts); see [`crate::parallel`].
    pub devices: usize,
    pub total_steps: usize,
    pub lr: f64,
    /// Learning-rate warm-up, in thousands of images (EDM: 10000).
    pub lr_rampup_kimg: f64,
    pub adam_betas: [f64; 2],
    pub adam_eps: f64,
    /// EMA half-life in thousands of images (EDM: 500), ramped up by `ema_rampup_ratio`.
    pub ema_halflife_kimg: f64,
    pub ema_rampup_ratio: Option<f64>,
    pub seed: u64,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// Write a sample grid (scatter plot for 2-D data) of the EMA network this often; 0: never.
    pub sample_every: usize,
    /// Checkpoints kept: the latest plus `keep_checkpoints - 1` older ones in `checkpoint.history/`.
    pub keep_checkpoints: usize,
    /// A step whose loss or gradient is NaN/Inf is skipped; this many in a row stop the run.
    pub max_nonfinite_in_a_row: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            micro_batches: 1,
            devices: 1,
            total_steps: 10_000,
            lr: 1e-3,
            lr_rampup_kimg: 10_000.0,
            adam_betas: [0.9, 0.999],
            adam_eps: 1e-8,
            ema_halflife_kimg: 500.0,
            ema_rampup_ratio: Some(0.05),
            seed: 0,
            log_every: 100,
            checkpoint_every: 1000,
            sample_every: 1000,
            keep_checkpoints: 2,
            max_nonfinite_in_a_row: 10,
        }
    }
}

/// How the finished teacher is evaluated (2-D toy data) and how its sample grids are drawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub num_samples: usize,
    pub sampler: SamplerConfig,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { num_samples: 2000, sampler: SamplerConfig::default(), seed: 1_000_000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub out_dir: PathBuf,
    #[serde(default)]
    pub device: Backend,
    pub data: DataConfig,
    /// EDM's `EDMPrecond` keyword arguments; `img_resolution`, `img_channels` and `label_dim`
    /// default to the data's.
    pub network: toml::Table,
    #[serde(default)]
    pub loss: EdmLossConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

impl TeacherConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_toml(path)?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch_size == 0 || t.total_steps == 0 {
            bail!("train.batch_size and train.total_steps must be positive");
        }
        if t.micro_batches == 0 || t.devices == 0 || t.micro_batches * t.devices > t.batch_size {
            bail!("train.micro_batches x train.devices must lie in 1..=batch_size ({}), got {} x {}", t.batch_size, t.micro_batches, t.devices);
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr must be positive, got {}", t.lr);
        }
        if t.log_every == 0 || t.checkpoint_every == 0 || t.keep_checkpoints == 0 || t.max_nonfinite_in_a_row == 0 {
            bail!("train.log_every, train.checkpoint_every, train.keep_checkpoints and train.max_nonfinite_in_a_row must be positive");
        }
        self.eval.sampler.validate().map_err(|e| anyhow::anyhow!("eval.sampler: {e}"))?;
        if !(t.adam_betas.iter().all(|b| (0.0..1.0).contains(b)) && t.adam_eps > 0.0) {
            bail!("train.adam_betas must lie in [0, 1) and train.adam_eps must be positive, got {:?} and {}", t.adam_betas, t.adam_eps);
        }
        if !(t.lr_rampup_kimg >= 0.0 && t.ema_halflife_kimg >= 0.0 && t.ema_rampup_ratio.is_none_or(|r| r >= 0.0)) {
            bail!("train.lr_rampup_kimg, train.ema_halflife_kimg and train.ema_rampup_ratio must not be negative");
        }
        let l = &self.loss;
        if !(l.p_std > 0.0 && l.p_std.is_finite() && l.p_mean.is_finite()) {
            bail!("loss.p_std must be positive and loss.p_mean finite, got p_std = {} and p_mean = {}", l.p_std, l.p_mean);
        }
        // The [network] table now, so that its errors name this file: with the data's shape for
        // toy data (known without reading anything), else with a stand-in shape that passes
        // every check (the data's own is checked when training starts).
        match &self.data {
            DataConfig::Toy { .. } => {
                self.network_config(&DataSource::open(&self.data)?)?;
            }
            _ => {
                let mut net = self.network.clone();
                let mlp = net.get("model_type").and_then(|v| v.as_str()) == Some("ToyMLP");
                net.entry("img_resolution").or_insert(toml::Value::Integer(if mlp { 1 } else { 4096 }));
                net.entry("img_channels").or_insert(toml::Value::Integer(3));
                EdmConfig::from_json_str(&serde_json::to_string(&net)?).map_err(|e| anyhow::anyhow!("[network]: {e}"))?;
            }
        }
        Ok(())
    }

    /// The network config: the `[network]` table with the data's shape filled in.
    pub fn network_config(&self, data: &DataSource) -> Result<EdmConfig> {
        let [c, h, _] = data.shape();
        let mut table = self.network.clone();
        let fill = |k: &str, v: usize, table: &mut toml::Table| -> Result<()> {
            match table.get(k) {
                None => {
                    table.insert(k.into(), toml::Value::Integer(v as i64));
                    Ok(())
                }
                Some(toml::Value::Integer(x)) if *x as usize == v => Ok(()),
                Some(x) => bail!("network.{k} = {x} disagrees with the data ({v})"),
            }
        };
        fill("img_resolution", h, &mut table)?;
        fill("img_channels", c, &mut table)?;
        fill("label_dim", data.label_dim(), &mut table)?;
        let json = serde_json::to_string(&table)?;
        EdmConfig::from_json_str(&json).map_err(|e| anyhow::anyhow!("[network]: {e}"))
    }
}

/// Where a run keeps its files.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint")
    }
    pub fn teacher(&self) -> PathBuf {
        self.0.join("teacher.safetensors")
    }
    fn config(&self) -> PathBuf {
        self.0.join("config.toml")
    }
    fn metrics(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }
}

/// A checkpoint's `state.json`: with the networks, the optimiser and the config beside it,
/// everything a resumed run needs to repeat the uninterrupted one bit for bit.
#[derive(Clone, Serialize, Deserialize)]
struct TrainState {
    /// Steps done; the learning-rate schedule and EMA follow `images_seen`.
    step: usize,
    images_seen: u64,
    /// Every random draw of step `s` (data order, noise levels, noise, dropout) comes from
    /// generators seeded with `step_seed(seed, s, stream)`: the step is the RNG and data position.
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    lr: f64,
    #[serde(default, flatten)]
    nonfinite: NonFiniteGuard,
}

pub use dmd_datasets::prompts::step_seed;

/// `n` standard normal draws as float32.
pub fn normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f64, _>(StandardNormal) as f32).collect()
}

/// The outcome of a training run.
pub struct TeacherRun {
    pub teacher: PathBuf,
    pub eval: Option<ToyEval>,
}

/// The config a run must keep to be resumed: what shapes the trained weights. The length,
/// device, output folder, logging/checkpoint/sample intervals and evaluation may change.
fn resume_key(cfg: &TeacherConfig) -> TeacherConfig {
    let mut c = cfg.clone();
    c.train.total_steps = 0;
    c.train.log_every = 0;
    c.train.checkpoint_every = 0;
    c.train.sample_every = 0;
    c.train.keep_checkpoints = 0;
    c.train.max_nonfinite_in_a_row = 0;
    c.train.micro_batches = 1;
    c.train.devices = 1;
    c.eval = EvalConfig::default();
    c.device = Backend::Cpu;
    c.out_dir = PathBuf::new();
    c
}

/// Whether the run folder holds the finished run of this config: the weights written and the
/// checkpoint at the last step of a config that trains the same weights.
pub fn finished(cfg: &TeacherConfig) -> Result<bool> {
    let run = RunDir(cfg.out_dir.clone());
    run_finished(&run.0, cfg, resume_key, cfg.train.total_steps, &run.teacher())
}

/// Trains (or resumes) the teacher of `cfg`; `force_resume` continues a run folder made with a
/// different config.
pub fn train(cfg: &TeacherConfig, show_progress: bool, force_resume: bool) -> Result<TeacherRun> {
    let run = RunDir(cfg.out_dir.clone());
    let data = DataSource::open(&cfg.data)?;
    let net_cfg = cfg.network_config(&data)?;
    let mut replicas = Replica::group(cfg.device, cfg.train.devices)?;
    let (main, device) = replicas.remove(0);
    // The folder only now that the data and the network config passed their checks.
    std::fs::create_dir_all(&run.0).with_context(|| run.0.display().to_string())?;

    // Resume when the folder holds a checkpoint of the same config.
    let saved_cfg = run.config();
    let previous = if saved_cfg.exists() { Some(TeacherConfig::from_file(&saved_cfg)?) } else { None };
    guard_config(&saved_cfg, cfg, previous, resume_key, force_resume)?;
    let ckpt = run.checkpoint();
    recover(&ckpt)?;
    let state: Option<TrainState> = if ckpt.join("state.json").exists() {
        Some(serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json"))?).with_context(|| ckpt.join("state.json").display().to_string())?)
    } else {
        None
    };
    if let Some(state) = &state {
        eprintln!("resuming {} from step {}", run.0.display(), state.step);
    }
    let start = state.as_ref().map_or(0, |s| s.step);
    truncate_jsonl(&run.metrics(), start)?;
    eprintln!("training {:?} teacher on {} with {} x {} on {}", net_cfg.model_type, data.describe(), cfg.train.devices, cfg.device, run.0.display());

    // One replica per device, the others in threads; only the main one writes files.
    let mut ema = None;
    run_replicas(
        &main,
        || {
            ema = Some(train_replica(cfg, &main, &device, &data, &net_cfg, state.clone(), show_progress)?);
            Ok(())
        },
        replicas,
        |r, device| train_replica(cfg, r, &device, &data, &net_cfg, state.clone(), false).map(|_| ()),
    )?;
    let ema = ema.expect("set when the main replica succeeds");

    ema.save(&run.teacher())?;
    eprintln!("teacher (EMA weights): {} (config {})", run.teacher().display(), config_path_for(&run.teacher()).display());
    let eval = match &cfg.data {
        DataConfig::Toy { name, .. } => {
            let (e, _) = eval_toy(&ema, &device, *name, &cfg.eval)?;
            write_atomic(&run.0.join("eval.json"), serde_json::to_string_pretty(&e)?.as_bytes())?;
            eprintln!("{}", e.summary());
            Some(e)
        }
        _ => None,
    };
    Ok(TeacherRun { teacher: run.teacher(), eval })
}

/// Steps `state.step..total_steps` of one replica's training (the only one with a single
/// device), from the checkpoint when `state` is given; returns the EMA network. The main
/// replica writes the metrics, checkpoints and sample grids.
fn train_replica(cfg: &TeacherConfig, replica: &Replica, device: &Device, data: &DataSource, net_cfg: &EdmConfig, state: Option<TrainState>, show_progress: bool) -> Result<EdmPrecond> {
    let run = RunDir(cfg.out_dir.clone());
    let ad = device.clone().autodiff();
    let t = &cfg.train;
    let adam = || crate::optim::adam(t.adam_betas[0] as f32, t.adam_betas[1] as f32, t.adam_eps as f32);
    let ckpt = run.checkpoint();
    let (mut net, mut ema, mut optim, start, mut images_seen, mut nonfinite) = match state {
        Some(state) => {
            let net = EdmPrecond::load(&ckpt.join("net.safetensors"), &ckpt.join("net.json"), &ad, "net")?;
            let ema = EdmPrecond::load(&ckpt.join("ema.safetensors"), &ckpt.join("ema.json"), device, "ema")?.valid();
            let optim = load_optimizer(adam(), &ckpt.join("optim.bpk"))?;
            (net, ema, optim, state.step, state.images_seen, state.nonfinite)
        }
        None => {
            let net = assign_ids(EdmPrecond::new(net_cfg, &ad, t.seed), "net");
            let ema = fork_named(&net.valid(), "ema");
            (net, ema, adam(), 0, 0, NonFiniteGuard::default())
        }
    };
    let main = replica.is_main();
    if main {
        let n_params: usize = dmd_models::weights::named_shapes(&net).values().map(|s| s.iter().product::<usize>()).sum();
        eprintln!("{:.2}M parameters", n_params as f64 / 1e6);
    }
    let bar = if show_progress && main { progress(t.total_steps as u64, "train-teacher") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(start as u64);
    let [c, h, w] = data.shape();
    let per = c * h * w;
    let bs = t.batch_size;
    // (loss sum, finite steps, start time, steps)
    let mut window = (0.0f64, 0usize, Instant::now(), 0usize);
    for step in start..t.total_steps {
        // All randomness of this step comes from (seed, step), drawn for the whole batch.
        let mut rng = StdRng::seed_from_u64(step_seed(t.seed, step as u64, 0));
        ad.seed(step_seed(t.seed, step as u64, 1)); // dropout
        let (images, labels) = data.batch(bs, &mut rng)?;
        let sigma: Vec<f32> = normals(&mut rng, bs).into_iter().map(|z| cfg.loss.sigma_from_normal(z as f64) as f32).collect();
        let noise = normals(&mut rng, bs * per);

        let images = images.to_tensor::<4>(&ad);
        let labels = labels.map(|l| l.to_tensor::<2>(&ad));
        let sigma = Tensor::<1>::from_data(TensorData::new(sigma, [bs]), &ad);
        let noise = Tensor::<4>::from_data(TensorData::new(noise, [bs, c, h, w]), &ad);
        // The batch's mean loss over this replica's `micro_batches` parts, summed over the
        // replicas (see `crate::parallel`).
        let (parts, mine) = replica.parts(bs, t.micro_batches);
        let mut bp = Backprop::default();
        for part in mine {
            let r = parts.rows(part);
            let loss = edm_loss(&net, rows(&images, &r), labels.as_ref().map(|l| rows(l, &r)), rows(&sigma, &r), rows(&noise, &r)).mean();
            bp.add(loss.mul_scalar(parts.weight(part)), &net, None::<&EdmPrecond>);
        }
        replica.reduce(&mut bp, &net, None::<&EdmPrecond>)?;
        let loss_value = bp.loss as f32;
        let lr = t.lr * ((images_seen as f64) / (t.lr_rampup_kimg * 1000.0).max(1e-8)).min(1.0);
        let beta = ema_beta(bs, images_seen, t.ema_halflife_kimg, t.ema_rampup_ratio);
        // A NaN/Inf loss or gradient skips the step (weights, EMA, optimiser untouched).
        let bad = match bp.grads {
            Some(grads) if loss_value.is_finite() => {
                let grad_norm = grad_norm(&grads, &net);
                if grad_norm.is_finite() {
                    net = optim.step(lr, net, grads);
                    ema = ema_update(ema, &net, beta);
                    images_seen += bs as u64;
                    None
                } else {
                    Some(format!("gradient norm {grad_norm}"))
                }
            }
            _ => Some(format!("loss {loss_value}")),
        };
        if let (Some(what), true) = (&bad, main) {
            bar.suspend(|| eprintln!("step {step}: {what}; step skipped"));
        }
        nonfinite.record(step, bad.as_deref(), t.max_nonfinite_in_a_row, &ckpt)?;

        let done = step + 1;
        bar.inc(1);
        if !main {
            continue;
        }
        if loss_value.is_finite() {
            window.0 += loss_value as f64;
            window.1 += 1;
        }
        window.3 += 1;
        if done % t.log_every == 0 || done == t.total_steps {
            let secs = window.2.elapsed().as_secs_f64();
            let mean_loss = window.0 / window.1.max(1) as f64;
            let line = serde_json::json!({
                "step": done,
                "kimg": images_seen as f64 / 1000.0,
                "loss": mean_loss,
                "lr": lr,
                "ema_beta": beta,
                "samples_per_s": (window.3 * bs) as f64 / secs.max(1e-9),
                "skipped_steps": nonfinite.skipped_steps,
            });
            append_jsonl(&run.metrics(), &line)?;
            bar.set_message(format!("train-teacher loss {mean_loss:.4}"));
            window = (0.0, 0, Instant::now(), 0);
        }
        // No checkpoint inside a streak of skipped steps: the one kept stays the last good one.
        if (done % t.checkpoint_every == 0 && nonfinite.in_a_row == 0) || done == t.total_steps {
            let state = TrainState { step: done, images_seen, seed: t.seed, lr, nonfinite: nonfinite.clone() };
            save_checkpoint(&ckpt, t.keep_checkpoints, cfg, &net, &ema, &optim, state)?;
        }
        if t.sample_every > 0 && (done % t.sample_every == 0 || done == t.total_steps) {
            let png = preview(&ema, device, &cfg.eval)?;
            write_atomic(&run.0.join("samples").join(format!("step-{done:07}.png")), &png)?;
        }
    }
    bar.finish_and_clear();
    Ok(ema)
}

/// The checkpoint: both networks under EDM's names, the optimiser, the state, the config.
fn save_checkpoint(dir: &Path, keep: usize, cfg: &TeacherConfig, net: &EdmPrecond, ema: &EdmPrecond, optim: &Optim, state: TrainState) -> Result<()> {
    write_dir_atomically(dir, keep, |tmp| {
        std::fs::write(tmp.join("config.toml"), toml::to_string_pretty(cfg)?)?;
        net.save(&tmp.join("net.safetensors"))?;
        ema.save(&tmp.join("ema.safetensors"))?;
        optim.save(tmp.join("optim.bpk")).map_err(|e| anyhow::anyhow!("{}: {e:?}", tmp.join("optim.bpk").display()))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string(&state)?)?;
        Ok(())
    })
}

/// A sample grid (or scatter plot for 2-D points) of the network.
fn preview(net: &EdmPrecond, device: &Device, eval: &EvalConfig) -> Result<Vec<u8>> {
    let points = net.image_shape() == [2, 1, 1];
    let n = if points { eval.num_samples.min(1000) } else { 64 };
    preview_png(&seeded_samples(net, device, n, eval.seed, &eval.sampler, 256))
}

/// Quality of a toy-data network's samples against fresh data.
#[derive(Clone, Debug, Serialize)]
pub struct ToyEval {
    pub distribution: ToyKind,
    pub num_samples: usize,
    pub nfe: usize,
    /// Energy distance between the network's samples and fresh data.
    pub energy_distance: f64,
    /// The same between two independent data sets of the same size: the floor.
    pub energy_distance_data_floor: f64,
    pub modes: Option<ModeStats>,
    /// The same mode statistics for fresh data: what a perfect model reaches.
    pub modes_data: Option<ModeStats>,
}

impl ToyEval {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:?}, {} samples at {} NFE: energy distance {:.5} (data-vs-data floor {:.5})",
            self.distribution, self.num_samples, self.nfe, self.energy_distance, self.energy_distance_data_floor
        );
        if let (Some(m), Some(d)) = (&self.modes, &self.modes_data) {
            s += &format!(
                ", modes covered {}/{}, {:.1}% within 3 std of a mode (data {:.1}%), mode KL {:.4} (data {:.4})",
                m.modes_covered,
                m.num_modes,
                100.0 * m.frac_near_mode,
                100.0 * d.frac_near_mode,
                m.mode_kl,
                d.mode_kl
            );
        }
        s
    }
}

/// Samples `eval.num_samples` points with the network and compares them to fresh data;
/// returns the comparison and the samples.
pub fn eval_toy(net: &EdmPrecond, device: &Device, kind: ToyKind, eval: &EvalConfig) -> Result<(ToyEval, HostTensor)> {
    if net.image_shape() != [2, 1, 1] {
        bail!("eval-toy needs a network on 2-D points ([2, 1, 1]), this one works on {:?}", net.image_shape());
    }
    let samples = seeded_samples(net, device, eval.num_samples, eval.seed, &eval.sampler, 1000);
    let e = toy_eval_of(&samples.data, &ToyDistribution::new(kind), eval.seed, eval.sampler.nfe());
    Ok((e, samples))
}

/// Compares points with the distribution, and two fresh data sets with each other (the floor).
pub fn toy_eval_of(samples: &[f32], dist: &ToyDistribution, seed: u64, nfe: usize) -> ToyEval {
    let n = samples.len() / 2;
    let mut rng = StdRng::seed_from_u64(step_seed(seed, 0, 7));
    let (data_a, _) = dist.sample_n(n, &mut rng);
    let (data_b, _) = dist.sample_n(n, &mut rng);
    ToyEval {
        distribution: dist.kind,
        num_samples: n,
        nfe,
        energy_distance: energy_distance(samples, &data_a),
        energy_distance_data_floor: energy_distance(&data_b, &data_a),
        modes: dist.mixture().map(|m| mode_stats(samples, m)),
        modes_data: dist.mixture().map(|m| mode_stats(&data_b, m)),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalToyArgs {
    /// The network (safetensors; its config is the same path with `.json`).
    #[arg(long)]
    pub net: PathBuf,
    #[arg(long)]
    pub net_config: Option<PathBuf>,
    /// eight_gaussians, twenty_five_gaussians, checkerboard, two_moons, swiss_roll.
    #[arg(long)]
    pub toy: ToyKind,
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    #[arg(long, default_value_t = 18)]
    pub steps: usize,
    #[arg(long, default_value = "heun")]
    pub sampler: dmd_models::Solver,
    /// Also write a scatter plot of the samples (blue) over data (grey).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The network is a generator from `dmd distill`: run its own one or few steps (the noise
    /// levels stored in its file) instead of EDM's sampler.
    #[arg(long)]
    pub generator: bool,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
}

pub fn eval_toy_cmd(args: &EvalToyArgs) -> Result<()> {
    let device = args.device.device()?;
    let cfg_path = args.net_config.clone().unwrap_or_else(|| config_path_for(&args.net));
    let net = EdmPrecond::load(&args.net, &cfg_path, &device, "net")?;
    let eval = EvalConfig {
        num_samples: args.samples,
        sampler: SamplerConfig { solver: args.sampler, num_steps: args.steps, ..SamplerConfig::default() },
        ..EvalConfig::default()
    };
    eval.sampler.validate().map_err(|e| anyhow::anyhow!("sampler: {e}"))?;
    let (result, samples) = if args.generator {
        if net.image_shape() != [2, 1, 1] {
            bail!("eval-toy needs a network on 2-D points ([2, 1, 1]), this one works on {:?}", net.image_shape());
        }
        let sigmas = crate::distill::generator_sigmas_of(&args.net, 80.0)?;
        let samples = crate::distill::generator_samples(&net, &device, eval.num_samples, eval.seed, &sigmas);
        (toy_eval_of(&samples.data, &ToyDistribution::new(args.toy), eval.seed, sigmas.len()), samples)
    } else {
        eval_toy(&net, &device, args.toy, &eval)?
    };
    println!("{}", serde_json::to_string(&result)?);
    eprintln!("{}", result.summary());
    if let Some(plot) = &args.plot {
        let (data, _) = ToyDistribution::new(args.toy).sample_n(args.samples, &mut StdRng::seed_from_u64(3));
        let data = HostTensor::new(vec![args.samples, 2, 1, 1], data);
        write_atomic(plot, &scatter_png(&[(&data, [190, 190, 190]), (&samples, [20, 60, 200])], 512)?)?;
    }
    Ok(())
}
