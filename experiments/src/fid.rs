//! `dmd fid`: Fréchet Inception Distance as EDM's `fid.py` computes it (and DMD/DMD2 report
//! it): 2048-d pool features of the FID Inception network, statistics accumulated in
//! float64 (mu, sigma with n - 1), EDM's `.npz` layout, and the Fréchet distance via
//! symmetric eigendecompositions (faer). Also the Inception Score from the same network.

use crate::device::Backend;
use crate::sample::{progress, ImageSource};
use anyhow::{bail, Context, Result};
use burn::tensor::{Tensor, TensorData};
use dmd_datasets::{to_pixels, ImageDataset};
use dmd_models::inception::{FidInception, FidPreprocess};
use dmd_models::weights::write_atomic;
use dmd_models::HostTensor;
use faer::{Mat, Side};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Feature statistics: mean [D] and covariance [D, D] (row-major), float64.
#[derive(Clone, Debug)]
pub struct FidStats {
    pub mu: Vec<f64>,
    pub sigma: Vec<f64>,
}

impl FidStats {
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Reads EDM's / pytorch-fid's statistics file (`mu` [D], `sigma` [D, D]).
    pub fn read_npz(path: &Path) -> Result<Self> {
        use std::io::Read;
        let p = path.display();
        let file = std::fs::File::open(path).with_context(|| format!("{p}: not a readable .npz"))?;
        let file_len = file.metadata().map_or(0, |m| m.len());
        let mut npz = dmd_datasets::image::open_zip(file).map_err(|e| anyhow::anyhow!("{p}: not a readable .npz: {e}"))?;
        let mut get = |name: &str| -> Result<(Vec<u64>, Vec<f64>)> {
            let mut member = match npz.by_name(&format!("{name}.npy")) {
                Ok(m) => m,
                Err(zip::result::ZipError::FileNotFound) => bail!("{p}: no array `{name}`"),
                Err(e) => return Err(e).with_context(|| format!("{p}: cannot read `{name}`")),
            };
            // At most what deflate can expand the whole file to (about 1032:1).
            let mut bytes = Vec::new();
            (&mut member).take(file_len.saturating_mul(1100)).read_to_end(&mut bytes).with_context(|| format!("{p}: cannot read `{name}`"))?;
            check_npy_header(&bytes).map_err(|e| anyhow::anyhow!("{p}: cannot read `{name}`: {e}"))?;
            let arr = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{p}: cannot read `{name}`"))?;
            let shape = arr.shape().to_vec();
            let data: Vec<f64> = match arr.dtype() {
                npyz::DType::Plain(t) if t.size_field() == 4 => arr.into_vec::<f32>().map(|v| v.into_iter().map(f64::from).collect()),
                _ => arr.into_vec::<f64>(),
            }
            .with_context(|| format!("{p}: `{name}` is not a float array"))?;
            Ok((shape, data))
        };
        let (mu_shape, mu) = get("mu")?;
        let (sigma_shape, sigma) = get("sigma")?;
        let d = mu.len() as u64;
        if mu_shape != [d] || sigma_shape != [d, d] {
            bail!("{p}: `mu` has shape {mu_shape:?} and `sigma` {sigma_shape:?}; expected [D] and [D, D]");
        }
        if let Some(name) = [("mu", &mu), ("sigma", &sigma)].iter().find(|(_, v)| v.iter().any(|x| !x.is_finite())).map(|(n, _)| n) {
            bail!("{p}: `{name}` has non-finite values");
        }
        Ok(Self { mu, sigma })
    }

    /// Writes the statistics as numpy's `savez` does (uncompressed, float64), atomically.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let d = self.dim();
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, shape, data) in [("mu", vec![d], &self.mu), ("sigma", vec![d, d], &self.sigma)] {
            zip.start_file(format!("{name}.npy"), opts)?;
            zip.write_all(&npy_f64(&shape, data))?;
        }
        let bytes = zip.finish()?.into_inner();
        write_atomic(path, &bytes).with_context(|| path.display().to_string())
    }
}

/// Checks a `.npy` header before npyz, which trusts it, parses it: a length field past the
/// data (allocated up front), a deeply nested literal (parsed recursively) or a shape whose
/// size overflows would allocate without bound, overflow the stack or panic. numpy itself
/// reads headers of at most 10000 bytes; the shape must be a tuple of plain integers whose
/// size fits in the data that follows.
fn check_npy_header(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (no magic string)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if len > 10_000 {
        return Err(format!("header of {len} bytes (numpy reads at most 10000)"));
    }
    let header = bytes.get(start..start + len).ok_or_else(|| format!("header of {len} bytes, the array has {}", bytes.len() - start))?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text".to_string())?;
    if header.contains('\\') {
        return Err("header has escape sequences".into());
    }
    let mut depth = 0usize;
    for c in header.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > 4 {
            return Err("header nests too deep".into());
        }
    }
    let data = (bytes.len() - start - len) as u128;
    for (at, _) in header.match_indices("shape") {
        let value = header[at + 5..].trim_start_matches(['\'', '"']).trim_start().strip_prefix(':').map(str::trim_start);
        let dims = value.and_then(|v| v.strip_prefix(['(', '['])).and_then(|v| v.split_once([')', ']'])).map(|(d, _)| d);
        let dims = dims.ok_or("`shape` is not a tuple")?;
        let mut size: u128 = 1;
        for d in dims.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let d: u64 = d.trim_end_matches('L').parse().map_err(|_| format!("shape ({dims}) is not a tuple of integers"))?;
            size = size.saturating_mul(d.max(1) as u128);
        }
        if size > data.max(1) {
            return Err(format!("shape ({dims}) declares more values than the {data} bytes of data hold"));
        }
    }
    Ok(())
}

/// A `.npy` (format 1.0) holding little-endian float64 in C order.
fn npy_f64(shape: &[usize], data: &[f64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic (6) + version (2) + length (2) + header ends on a 64-byte boundary.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Running sums of features in float64, as EDM's `fid.py` accumulates them.
pub struct StatsAccumulator {
    n: usize,
    sum: Vec<f64>,
    sum_outer: Mat<f64>,
}

impl StatsAccumulator {
    pub fn new(dim: usize) -> Self {
        Self { n: 0, sum: vec![0.0; dim], sum_outer: Mat::zeros(dim, dim) }
    }

    /// Adds a batch of features, [rows, D] row-major.
    pub fn add(&mut self, features: &[f32]) {
        let d = self.sum.len();
        let rows = features.len() / d;
        let f = Mat::<f64>::from_fn(rows, d, |i, j| features[i * d + j] as f64);
        for i in 0..rows {
            for j in 0..d {
                self.sum[j] += f[(i, j)];
            }
        }
        self.sum_outer += f.transpose() * &f;
        self.n += rows;
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// mu = sum / n; sigma = (sum_outer - n mu mu^T) / (n - 1).
    pub fn finish(&self) -> Result<FidStats> {
        let (n, d) = (self.n, self.sum.len());
        if n < 2 {
            bail!("FID statistics need at least 2 images, got {n}");
        }
        let mu: Vec<f64> = self.sum.iter().map(|s| s / n as f64).collect();
        let mut sigma = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                sigma[i * d + j] = (self.sum_outer[(i, j)] - n as f64 * mu[i] * mu[j]) / (n - 1) as f64;
            }
        }
        Ok(FidStats { mu, sigma })
    }
}

/// ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the square
/// root is taken as tr((A S_b A)^(1/2)) with A = S_a^(1/2): the same eigenvalues, from
/// symmetric matrices only (negative eigenvalues from rounding are clamped to 0).
pub fn frechet_distance(a: &FidStats, b: &FidStats) -> Result<f64> {
    let d = a.dim();
    if b.dim() != d {
        bail!("statistics of different dimension: {d} vs {}", b.dim());
    }
    let mat = |s: &[f64]| Mat::<f64>::from_fn(d, d, |i, j| s[i * d + j]);
    let (sa, sb) = (mat(&a.sigma), mat(&b.sigma));
    let eig = sa.self_adjoint_eigen(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    let (u, s) = (eig.U(), eig.S().column_vector());
    let root = Mat::<f64>::from_fn(d, d, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
    let sqrt_a = &root * u.transpose();
    let m = &sqrt_a * &sb * &sqrt_a;
    let m = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let ev = m.self_adjoint_eigenvalues(Side::Lower).map_err(|e| anyhow::anyhow!("eigenvalues failed: {e:?}"))?;
    let tr_sqrt: f64 = ev.iter().map(|v| v.max(0.0).sqrt()).sum();
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    Ok(diff + trace(&a.sigma) + trace(&b.sigma) - 2.0 * tr_sqrt)
}

#[derive(clap::Subcommand, Debug)]
pub enum FidCommand {
    /// Reference statistics of a set of images (EDM's `fid.py ref`).
    Ref {
        #[command(flatten)]
        src: FeatureArgs,
        /// Where to write the statistics (`.npz`: `mu`, `sigma`).
        #[arg(long)]
        out: PathBuf,
    },
    /// FID of a set of images against reference statistics (EDM's `fid.py calc`).
    Calc {
        #[command(flatten)]
        src: FeatureArgs,
        #[arg(long = "ref")]
        reference: PathBuf,
        /// Also write {"fid": .., "num_images": ..} here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The Fréchet distance between two statistics files.
    Distance { a: PathBuf, b: PathBuf },
    /// The Inception Score of a set of images (needs the classifier: pytorch-fid's weights).
    Is {
        #[command(flatten)]
        src: FeatureArgs,
        /// Consecutive chunks the score is averaged over (10 in the literature).
        #[arg(long, default_value_t = 10)]
        splits: usize,
    },
}

#[derive(clap::Args, Debug)]
pub struct FeatureArgs {
    /// Images: a folder of images (searched recursively) or an EDM dataset zip.
    #[arg(long, conflicts_with_all = ["generator", "teacher"])]
    pub images: Option<PathBuf>,
    /// Or generate them: a generator from `dmd distill` (its own one or few steps)...
    #[arg(long, conflicts_with = "teacher")]
    pub generator: Option<PathBuf>,
    /// ... or a teacher sampled with EDM's Heun sampler (`--steps`).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    #[arg(long, default_value_t = 18)]
    pub steps: usize,
    /// Number of images (all of `--images` by default; required when generating). Generated
    /// images use seeds 0..N, each with a random class as EDM's `generate.py` draws them.
    #[arg(long)]
    pub num: Option<usize>,
    /// The FID Inception weights as safetensors under pytorch-fid's names
    /// (`tools/inception_to_safetensors.py` converts NVIDIA's or pytorch-fid's file).
    #[arg(long)]
    pub inception: PathBuf,
    /// `nvidia` (EDM's, default: its reference statistics were made so) or `pytorch-fid`.
    #[arg(long, value_enum, default_value = "nvidia")]
    pub mode: FidMode,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FidMode {
    Nvidia,
    PytorchFid,
}

impl From<FidMode> for FidPreprocess {
    fn from(m: FidMode) -> Self {
        match m {
            FidMode::Nvidia => FidPreprocess::Nvidia,
            FidMode::PytorchFid => FidPreprocess::PytorchFid,
        }
    }
}

/// Feature statistics of the images `args` names, and how many there were.
pub fn stats_of(args: &FeatureArgs) -> Result<(FidStats, usize)> {
    let net = FidInception::load(&args.inception, &args.device.device()?)?;
    let mut acc = StatsAccumulator::new(2048);
    for_each_feature_batch(args, &net, &mut |features| {
        acc.add(&HostTensor::from_tensor(features).data);
        Ok(())
    })?;
    Ok((acc.finish()?, acc.count()))
}

/// Pool features [B, 2048] of 8-bit pixels [B, C, H, W].
pub fn pixel_features(net: &FidInception, mode: FidPreprocess, pixels: Vec<u8>, shape: [usize; 4], device: &burn::tensor::Device) -> Tensor<2> {
    let x = Tensor::<4>::from_data(TensorData::new(pixels.into_iter().map(f32::from).collect::<Vec<f32>>(), shape), device);
    net.features_of_pixels(x, mode)
}

/// Pool features [B, 2048] of images in the networks' [-1, 1] space, quantised to 8-bit
/// pixels first as saved PNGs would be (EDM's generate.py + fid.py).
pub fn image_features(net: &FidInception, mode: FidPreprocess, x: &HostTensor, device: &burn::tensor::Device) -> Tensor<2> {
    let shape = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    pixel_features(net, mode, to_pixels(&x.data), shape, device)
}

/// Runs `net` over the images `args` names, in batches, handing each batch's pool features
/// [B, 2048] to `f`. Returns the number of images.
fn for_each_feature_batch(args: &FeatureArgs, net: &FidInception, f: &mut dyn FnMut(Tensor<2>) -> Result<()>) -> Result<usize> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let device = args.device.device()?;
    let mode = FidPreprocess::from(args.mode);
    let mut add = |pixels: Vec<u8>, shape: [usize; 4]| f(pixel_features(net, mode, pixels, shape, &device));
    let n = match (&args.images, &args.generator, &args.teacher) {
        (Some(path), _, _) => {
            let set = ImageDataset::open(path)?;
            let n = args.num.unwrap_or(set.len());
            if n > set.len() {
                bail!("{}: --num {n}, but it holds {} images", path.display(), set.len());
            }
            check_channels(set.shape[0], &path.display().to_string())?;
            let bar = progress(n as u64, "inception");
            for start in (0..n).step_by(args.batch) {
                let end = (start + args.batch).min(n);
                let mut px = Vec::new();
                for i in start..end {
                    px.extend(set.image(i)?);
                }
                let [c, h, w] = set.shape;
                add(px, [end - start, c, h, w])?;
                bar.inc((end - start) as u64);
            }
            bar.finish_and_clear();
            n
        }
        (None, g, t) => {
            if g.is_none() && t.is_none() {
                bail!("give --images DIR|ZIP, --generator NET or --teacher NET");
            }
            let n = args.num.context("--num N: how many images to generate")?;
            let source = ImageSource::open(g.as_deref(), t.as_deref(), args.steps, &device)?;
            check_channels(source.net.image_shape()[0], &source.weights.display().to_string())?;
            let bar = progress(n as u64, "generating + inception");
            for start in (0..n).step_by(args.batch) {
                let m = (start + args.batch).min(n) - start;
                let seeds: Vec<u64> = (start as u64..(start + m) as u64).collect();
                f(image_features(net, mode, &source.samples(&seeds, None), &device))?;
                bar.inc(m as u64);
            }
            bar.finish_and_clear();
            n
        }
    };
    Ok(n)
}

/// The Inception Score's logits: pool features times the 1008-class classifier weight, without
/// its bias (the original TF implementation's and torch-fidelity's `logits_unbiased`).
fn classifier_weight(named: &dmd_models::NamedTensors, path: &Path, device: &burn::tensor::Device) -> Result<Tensor<2>> {
    let w = named.get("fc.weight").with_context(|| format!("{}: no `fc.weight` (the 1008-class classifier the Inception Score needs)", path.display()))?;
    if w.shape != [1008, 2048] {
        bail!("{}: `fc.weight` has shape {:?}, expected [1008, 2048]", path.display(), w.shape);
    }
    if w.data.iter().all(|&v| v == 0.0) {
        bail!("{}: `fc.weight` is all zeros (NVIDIA's port has no classifier): use pytorch-fid's weights for the Inception Score", path.display());
    }
    Ok(w.to_tensor(device))
}

/// Inception Score from logits [N, C] (row-major): softmax per image, then for each of
/// `splits` consecutive chunks exp(mean KL(p(y|x) || p(y))) with p(y) the chunk's mean;
/// returns the mean and the standard deviation (population, ddof 0) over chunks. float64.
pub fn inception_score(logits: &[f32], classes: usize, splits: usize) -> Result<(f64, f64)> {
    let n = logits.len() / classes;
    if splits == 0 || n < splits {
        bail!("the Inception Score needs at least as many images ({n}) as splits ({splits})");
    }
    let probs: Vec<Vec<f64>> = logits
        .chunks_exact(classes)
        .map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        })
        .collect();
    let scores: Vec<f64> = (0..splits)
        .map(|k| {
            let part = &probs[k * n / splits..(k + 1) * n / splits];
            let py: Vec<f64> = (0..classes).map(|c| part.iter().map(|p| p[c]).sum::<f64>() / part.len() as f64).collect();
            let kl: f64 = part.iter().map(|p| p.iter().zip(&py).map(|(&a, &b)| if a > 0.0 { a * (a.ln() - b.ln()) } else { 0.0 }).sum::<f64>()).sum::<f64>() / part.len() as f64;
            kl.exp()
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64;
    Ok((mean, var.sqrt()))
}

fn check_channels(c: usize, what: &str) -> Result<()> {
    if c != 1 && c != 3 {
        bail!("{what}: FID needs 1- or 3-channel images, these have {c}");
    }
    Ok(())
}

pub fn run(cmd: &FidCommand) -> Result<()> {
    match cmd {
        FidCommand::Ref { src, out } => {
            let (stats, n) = stats_of(src)?;
            stats.write_npz(out)?;
            eprintln!("statistics of {n} images: {}", out.display());
        }
        FidCommand::Calc { src, reference, json } => {
            let reference = FidStats::read_npz(reference)?;
            let (stats, n) = stats_of(src)?;
            let fid = frechet_distance(&stats, &reference)?;
            println!("{fid:.6}");
            eprintln!("FID-{n} ({:?} preprocessing)", src.mode);
            if let Some(path) = json {
                let v = serde_json::json!({ "fid": fid, "num_images": n, "mode": format!("{:?}", src.mode) });
                write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
            }
        }
        FidCommand::Is { src, splits } => {
            let device = src.device.device()?;
            // One read of the weights file for the classifier and the network.
            let named = dmd_models::NamedTensors::read(&src.inception)?;
            let w = classifier_weight(&named, &src.inception, &device)?;
            let net = FidInception::from_named(named, &src.inception.display().to_string(), &device)?;
            let mut logits = Vec::new();
            let n = for_each_feature_batch(src, &net, &mut |features| {
                logits.extend(HostTensor::from_tensor(features.matmul(w.clone().transpose())).data);
                Ok(())
            })?;
            let (mean, std) = inception_score(&logits, 1008, *splits)?;
            println!("{mean:.6} {std:.6}");
            eprintln!("Inception Score of {n} images: {mean:.4} +- {std:.4} ({splits} splits)");
        }
        FidCommand::Distance { a, b } => {
            let fid = frechet_distance(&FidStats::read_npz(a)?, &FidStats::read_npz(b)?)?;
            println!("{fid:.6}");
        }
    }
    Ok(())
}
