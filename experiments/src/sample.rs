//! `dmd sample`: runs EDM's sampler on a network from latents in a file or drawn from seeds.

use crate::device::Backend;
use crate::distill::{generate_steps, generator_sigmas_of};
use crate::output::{write_images, OutKind};
use anyhow::{bail, Context, Result};
use dmd_models::weights::write_atomic;
use dmd_models::{config_path_for, sample, EdmPrecond, HostTensor, NamedTensors, NetDenoiser, SamplerConfig, Solver};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    /// The network: EDM weights as safetensors (EDM's state_dict names).
    #[arg(long, required_unless_present = "generator", conflicts_with = "generator")]
    pub teacher: Option<PathBuf>,
    /// A generator from `dmd distill`: one denoiser call at sigma_max, or its own few steps
    /// (the noise levels stored in the file); the sampler options do not apply.
    #[arg(long)]
    pub generator: Option<PathBuf>,
    /// Its config (EDM's constructor kwargs as JSON); default: the same path with `.json`.
    #[arg(long)]
    pub teacher_config: Option<PathBuf>,
    /// Safetensors with `latents` [N,C,H,W] float32 (unit variance) and, for a conditional
    /// network, `labels` [N,L] one-hot.
    #[arg(long, conflicts_with = "seeds")]
    pub latents: Option<PathBuf>,
    /// Draw latents from seeds instead, e.g. `0-63` or `0,5,10-12` (one image per seed).
    #[arg(long)]
    pub seeds: Option<String>,
    /// Class of every image (conditional networks); default: a random class per seed.
    #[arg(long)]
    pub class: Option<usize>,
    /// Number of noise levels (1 = a single denoiser call at sigma_max); default 18 for a
    /// teacher, 1 for a generator.
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value = "heun")]
    pub sampler: Solver,
    /// Stochasticity S_churn of EDM's stochastic sampler (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    #[arg(long, default_value_t = 0.0)]
    pub s_min: f64,
    #[arg(long, default_value_t = f64::INFINITY)]
    pub s_max: f64,
    #[arg(long, default_value_t = 1.0)]
    pub s_noise: f64,
    #[arg(long, default_value_t = 0.002)]
    pub sigma_min: f64,
    #[arg(long, default_value_t = 80.0)]
    pub sigma_max: f64,
    #[arg(long, default_value_t = 7.0)]
    pub rho: f64,
    /// `.safetensors` (tensor `images`), `.png` (a grid), or a folder (one PNG per image).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per network call.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
    /// `I/N`: sample only part I (0-based) of N, into a folder `--out`: the images are cut
    /// into batches of `--batch` in the order given and this run does batches I, I+N, I+2N, ...
    /// N runs with the same images, `--batch` and device write exactly the files of one
    /// unsharded run.
    #[arg(long, value_name = "I/N", allow_hyphen_values = true)]
    pub shard: Option<String>,
}

/// `--shard I/N`: one of N processes (or devices) that split a job, numbered 0..N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole job (`0/1`).
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Parses `I/N` with 0 <= I < N; errors name the flag.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("--shard: cannot read `{spec}` (expected I/N with 0 <= I < N, e.g. 0/4)");
        let (i, n) = spec.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            bail!("--shard {spec}: the number of shards N must be at least 1");
        }
        if index >= count {
            bail!("--shard {spec}: the index I must be below N = {count} (shards are numbered 0..N-1)");
        }
        Ok(Self { index, count })
    }

    /// [`Shard::parse`] of an optional flag; absent: the whole job.
    pub fn from_arg(spec: Option<&str>) -> Result<Self> {
        spec.map_or(Ok(Self::WHOLE), Self::parse)
    }

    /// Whether part `k` (a pair shard, a batch) belongs to this shard: k % N == I.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    /// The rows of an n-row job cut into batches of `batch` that this shard does, in order:
    /// whole batches of the unsharded run, so every image is computed in the same batch.
    pub fn batch_rows(&self, n: usize, batch: usize) -> Vec<usize> {
        let batch = batch.max(1);
        (0..n).filter(|i| self.owns(i / batch)).collect()
    }
}

/// Parses `0-63`, `5`, `0,3,10-12`.
pub fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--seeds: cannot read `{part}` (expected e.g. 0-63 or 0,5,7-9)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().with_context(bad)?, b.trim().parse().with_context(bad)?);
                if b < a {
                    bail!("--seeds: empty range `{part}`");
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().with_context(bad)?),
        }
    }
    if out.is_empty() {
        bail!("--seeds: no seeds given");
    }
    Ok(out)
}

/// Latents (and one-hot labels) for `seeds`: image i depends only on its seed.
pub fn latents_from_seeds(seeds: &[u64], shape: [usize; 3], label_dim: usize, class: Option<usize>) -> (HostTensor, Option<HostTensor>) {
    let per: usize = shape.iter().product();
    let mut z = Vec::with_capacity(seeds.len() * per);
    let mut labels = Vec::new();
    for &seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        z.extend((0..per).map(|_| rng.sample::<f64, _>(StandardNormal) as f32));
        if label_dim > 0 {
            let k = class.unwrap_or_else(|| rng.random_range(0..label_dim));
            labels.extend((0..label_dim).map(|j| if j == k { 1.0 } else { 0.0 }));
        }
    }
    let n = seeds.len();
    let latents = HostTensor::new(vec![n, shape[0], shape[1], shape[2]], z);
    let labels = (label_dim > 0).then(|| HostTensor::new(vec![n, label_dim], labels));
    (latents, labels)
}

/// The fresh noise a multi-step generator adds before its step `k` (k >= 1), per image from
/// its seed (independent of the latents drawn from the same seed).
pub fn step_noise(seeds: &[u64], shape: [usize; 3], k: usize) -> HostTensor {
    let per: usize = shape.iter().product();
    let mut z = Vec::with_capacity(seeds.len() * per);
    for &seed in seeds {
        let mut rng = StdRng::seed_from_u64(crate::teacher::step_seed(seed, k as u64, 0x6e6f_6973));
        z.extend((0..per).map(|_| rng.sample::<f64, _>(StandardNormal) as f32));
    }
    HostTensor::new(vec![seeds.len(), shape[0], shape[1], shape[2]], z)
}

/// A generator's output for latents `z` (and labels): its steps over `sigmas`, the noise of
/// later steps drawn from each image's seed (`seeds`, one per row).
pub fn run_generator(net: &EdmPrecond, device: &burn::tensor::Device, z: &HostTensor, labels: Option<&HostTensor>, seeds: &[u64], sigmas: &[f64]) -> HostTensor {
    let shape = net.image_shape();
    let x = generate_steps(net, z.to_tensor(device), labels.map(|l| l.to_tensor(device)), sigmas, |k| step_noise(seeds, shape, k).to_tensor(device));
    HostTensor::from_tensor(x)
}

/// A network that draws images for seeds: a generator from `dmd distill` (its own steps, the
/// noise levels stored in its file) or a teacher (EDM's Heun sampler with `steps`).
pub struct ImageSource {
    pub net: EdmPrecond,
    pub weights: PathBuf,
    generator_sigmas: Option<Vec<f64>>,
    sampler: SamplerConfig,
    device: burn::tensor::Device,
}

impl ImageSource {
    pub fn open(generator: Option<&Path>, teacher: Option<&Path>, steps: usize, device: &burn::tensor::Device) -> Result<Self> {
        let weights = generator.or(teacher).context("give --generator NET or --teacher NET")?;
        let net = EdmPrecond::load(weights, &config_path_for(weights), device, "sampled")?;
        let generator_sigmas = match generator {
            Some(g) => Some(generator_sigmas_of(g, 80.0)?),
            None => None,
        };
        let sampler = SamplerConfig { num_steps: steps, ..SamplerConfig::default() };
        sampler.validate().map_err(|e| anyhow::anyhow!("sampler: {e}"))?;
        Ok(Self { net, weights: weights.to_path_buf(), generator_sigmas, sampler, device: device.clone() })
    }

    /// Images [seeds, C, H, W] for `seeds` (latents from each seed; `class` for every image, or
    /// a random class per seed).
    pub fn samples(&self, seeds: &[u64], class: Option<usize>) -> HostTensor {
        let (z, labels) = latents_from_seeds(seeds, self.net.image_shape(), self.net.label_dim(), class);
        match &self.generator_sigmas {
            Some(s) => run_generator(&self.net, &self.device, &z, labels.as_ref(), seeds, s),
            None => sample_batched(&self.net, &self.device, &z, labels.as_ref(), &self.sampler, seeds, seeds.len(), false),
        }
    }
}

/// Reads and checks a latents file against the network's image shape and label count.
pub fn read_latents(path: &Path, shape: [usize; 3], label_dim: usize) -> Result<(HostTensor, Option<HostTensor>)> {
    let file = NamedTensors::read(path)?;
    let p = path.display();
    let latents = file.get("latents").with_context(|| format!("{p}: no tensor `latents`"))?.clone();
    let want = [shape[0], shape[1], shape[2]];
    if latents.shape.len() != 4 || latents.shape[1..] != want {
        bail!("{p}: tensor `latents` has shape {:?}, the network needs [N, {}, {}, {}]", latents.shape, want[0], want[1], want[2]);
    }
    let n = latents.shape[0];
    let labels = match (file.get("labels"), label_dim) {
        (None, 0) => None,
        (Some(_), 0) => bail!("{p}: has `labels` but the network is unconditional (label_dim 0)"),
        (None, l) => bail!("{p}: no tensor `labels`, but the network is conditional ({l} classes): add one-hot `labels` [N, {l}]"),
        (Some(l), dim) => {
            if l.shape != [n, dim] {
                bail!("{p}: tensor `labels` has shape {:?}, expected [{n}, {dim}]", l.shape);
            }
            Some(l.clone())
        }
    };
    if latents.data.iter().any(|v| !v.is_finite()) {
        bail!("{p}: tensor `latents` holds a non-finite value");
    }
    Ok((latents, labels))
}

/// Splits rows [start, end) out of an [N, ...] tensor.
pub fn rows(t: &HostTensor, start: usize, end: usize) -> HostTensor {
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    HostTensor::new(shape, t.data[start * per..end * per].to_vec())
}

/// The rows `idx` of an [N, ...] tensor, in that order.
pub fn take_rows(t: &HostTensor, idx: &[usize]) -> HostTensor {
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = idx.len();
    HostTensor::new(shape, idx.iter().flat_map(|&i| t.data[i * per..(i + 1) * per].iter().copied()).collect())
}

/// Stacks [n_i, ...] tensors along the first axis.
pub fn concat_rows(parts: &[HostTensor]) -> HostTensor {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    HostTensor::new(shape, parts.iter().flat_map(|p| p.data.iter().copied()).collect())
}

pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ({elapsed}<{eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Samples every image of `latents` in batches of `batch`, with a progress bar.
pub fn sample_batched(
    net: &EdmPrecond,
    device: &burn::tensor::Device,
    latents: &HostTensor,
    labels: Option<&HostTensor>,
    cfg: &SamplerConfig,
    churn_seeds: &[u64],
    batch: usize,
    show_progress: bool,
) -> HostTensor {
    let n = latents.shape[0];
    let bar = if show_progress { progress(n as u64, "sampling") } else { ProgressBar::hidden() };
    let denoiser = NetDenoiser { net, device: device.clone() };
    let mut outs = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch).min(n);
        let lat = rows(latents, start, end);
        let lab = labels.map(|l| rows(l, start, end));
        // Churn noise per image, seeded apart from its latents.
        let mut rngs: Vec<StdRng> = churn_seeds[start..end].iter().map(|&s| StdRng::seed_from_u64(s ^ 0x5eed_c4a2_0000_0000)).collect();
        outs.push(sample(&denoiser, &lat, lab.as_ref(), cfg, &mut rngs, |_| {}));
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    concat_rows(&outs)
}

/// Samples of `net` for seeds `first_seed..first_seed + n` (a random class per seed for a
/// conditional network), in batches of `batch`, without a progress bar.
pub fn seeded_samples(net: &EdmPrecond, device: &burn::tensor::Device, n: usize, first_seed: u64, cfg: &SamplerConfig, batch: usize) -> HostTensor {
    let seeds: Vec<u64> = (0..n as u64).map(|i| first_seed + i).collect();
    let (latents, labels) = latents_from_seeds(&seeds, net.image_shape(), net.label_dim(), None);
    sample_batched(net, device, &latents, labels.as_ref(), cfg, &seeds, batch, false)
}

pub fn run(args: &SampleArgs) -> Result<()> {
    let (weights, default_steps) = match (&args.teacher, &args.generator) {
        (Some(t), _) => (t.clone(), 18),
        (None, Some(g)) => (g.clone(), 1),
        (None, None) => bail!("give --teacher NET or --generator NET"),
    };
    let cfg = SamplerConfig {
        solver: args.sampler,
        num_steps: args.steps.unwrap_or(default_steps),
        sigma_min: args.sigma_min,
        sigma_max: args.sigma_max,
        rho: args.rho,
        s_churn: args.churn,
        s_min: args.s_min,
        s_max: args.s_max,
        s_noise: args.s_noise,
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("sampler: {e}"))?;
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let shard = Shard::from_arg(args.shard.as_deref())?;
    if args.shard.is_some() && OutKind::of(&args.out) != OutKind::Folder {
        bail!("--shard: needs a folder --out (one PNG per image, named by seed), not {}", args.out.display());
    }
    let device = args.device.device()?;
    let config_path = args.teacher_config.clone().unwrap_or_else(|| config_path_for(&weights));
    let net = EdmPrecond::load(&weights, &config_path, &device, "teacher")?;
    let shape = net.image_shape();
    let label_dim = net.label_dim();
    if let Some(k) = args.class {
        if k >= label_dim {
            bail!("--class {k}: the network has {label_dim} classes");
        }
    }
    let (latents, labels, names, churn_seeds) = match (&args.latents, &args.seeds) {
        (Some(path), _) => {
            let (l, lab) = read_latents(path, shape, label_dim)?;
            let n = l.shape[0];
            let names: Vec<String> = (0..n).map(|i| format!("{i:06}")).collect();
            (l, lab, names, (0..n as u64).collect::<Vec<_>>())
        }
        (None, Some(spec)) => {
            let seeds = parse_seeds(spec)?;
            let (l, lab) = latents_from_seeds(&seeds, shape, label_dim, args.class);
            let names: Vec<String> = seeds.iter().map(|s| format!("{s:06}")).collect();
            (l, lab, names, seeds)
        }
        (None, None) => bail!("give --latents FILE or --seeds RANGE"),
    };
    if OutKind::of(&args.out) == OutKind::Folder && args.out.is_file() {
        bail!("{}: exists and is a file; --out takes a .safetensors file, a .png grid, or a folder", args.out.display());
    }
    // A shard keeps whole batches of the unsharded run (same rows, same batch boundaries), so
    // its images are bit for bit the unsharded run's; each image's noise comes from its seed.
    let (latents, labels, names, churn_seeds) = if args.shard.is_some() {
        let idx = shard.batch_rows(latents.shape[0], args.batch);
        if idx.is_empty() {
            std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
            eprintln!("shard {}/{}: no images (only {} batch(es) of {})", shard.index, shard.count, latents.shape[0].div_ceil(args.batch), args.batch);
            return Ok(());
        }
        let names: Vec<String> = idx.iter().map(|&i| names[i].clone()).collect();
        let churn: Vec<u64> = idx.iter().map(|&i| churn_seeds[i]).collect();
        (take_rows(&latents, &idx), labels.as_ref().map(|l| take_rows(l, &idx)), names, churn)
    } else {
        (latents, labels, names, churn_seeds)
    };
    let part = if args.shard.is_some() { format!(" (shard {}/{})", shard.index, shard.count) } else { String::new() };
    if args.generator.is_some() {
        let sigmas = generator_sigmas_of(&weights, args.sigma_max)?;
        let n = latents.shape[0];
        let bar = progress(n as u64, "sampling");
        let mut outs = Vec::new();
        for start in (0..n).step_by(args.batch) {
            let end = (start + args.batch).min(n);
            let lab = labels.as_ref().map(|l| rows(l, start, end));
            outs.push(run_generator(&net, &device, &rows(&latents, start, end), lab.as_ref(), &churn_seeds[start..end], &sigmas));
            bar.inc((end - start) as u64);
        }
        bar.finish_and_clear();
        write_images(&args.out, &concat_rows(&outs), labels.as_ref(), &names)?;
        eprintln!("wrote {n} images{part} ({} generator step(s) at sigma {sigmas:?}) to {}", sigmas.len(), args.out.display());
        return Ok(());
    }
    let images = sample_batched(&net, &device, &latents, labels.as_ref(), &cfg, &churn_seeds, args.batch, true);
    write_images(&args.out, &images, labels.as_ref(), &names)?;
    eprintln!(
        "wrote {} images{part} ({} steps, {} sampler, {} network evaluations each) to {}",
        images.shape[0],
        cfg.num_steps,
        match cfg.solver {
            Solver::Heun => "heun",
            Solver::Euler => "euler",
        },
        cfg.nfe(),
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct GridArgs {
    /// A generator from `dmd distill` (its own one or few steps)...
    #[arg(long, required_unless_present = "teacher", conflicts_with = "teacher")]
    pub generator: Option<PathBuf>,
    /// ... or a teacher, sampled with EDM's Heun sampler.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    #[arg(long, default_value_t = 18)]
    pub steps: usize,
    /// Classes, one per row, e.g. `0-9` or `3,7` (default: every class; one row for an
    /// unconditional network).
    #[arg(long)]
    pub classes: Option<String>,
    /// Images per row.
    #[arg(long, default_value_t = 8)]
    pub per_class: usize,
    /// Row k, column j uses seed `seed + k * per_class + j`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
}

/// `dmd grid`: one row of samples per class.
pub fn grid(args: &GridArgs) -> Result<()> {
    let device = args.device.device()?;
    let source = ImageSource::open(args.generator.as_deref(), args.teacher.as_deref(), args.steps, &device)?;
    let (shape, label_dim) = (source.net.image_shape(), source.net.label_dim());
    if shape[1] == 1 && shape[2] == 1 {
        bail!("{}: `dmd grid` is for images; use `dmd eval-toy --plot` for 2-D points", source.weights.display());
    }
    let classes: Vec<Option<usize>> = match (&args.classes, label_dim) {
        (_, 0) => vec![None],
        (None, l) => (0..l).map(Some).collect(),
        (Some(spec), l) => {
            let ks = parse_seeds(spec).map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("--seeds", "--classes")))?;
            if let Some(k) = ks.iter().find(|&&k| k as usize >= l) {
                bail!("--classes: class {k}, but the network has {l}");
            }
            ks.into_iter().map(|k| Some(k as usize)).collect()
        }
    };
    let per = args.per_class.max(1);
    let mut rows = Vec::new();
    for (k, class) in classes.iter().enumerate() {
        let seeds: Vec<u64> = (0..per as u64).map(|j| args.seed + (k * per) as u64 + j).collect();
        rows.push(source.samples(&seeds, *class));
    }
    let all = concat_rows(&rows);
    write_atomic(&args.out, &crate::output::grid_png_cols(&all, per)?).with_context(|| args.out.display().to_string())?;
    eprintln!("wrote {} rows x {per} to {}", classes.len(), args.out.display());
    Ok(())
}
