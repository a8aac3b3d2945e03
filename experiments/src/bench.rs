//! `dmd bench`: speed of the denoiser forward pass (images/s), one teacher training step
//! (forward + backward + Adam) and one DMD iteration per backend; with `--fid`, the Inception
//! network's images/s and a 2048-d Fréchet distance. Numbers are printed, never asserted.

use crate::device::Backend;
use crate::distill::{DistillConfig, Distiller};
use crate::fid::{frechet_distance, StatsAccumulator};
use dmd_models::inception::{FidInception, FidPreprocess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use anyhow::{Context, Result};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use dmd_losses::edm::edm_loss;
use dmd_models::weights::assign_ids;
use dmd_models::{EdmConfig, EdmPrecond};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Network config (EDM kwargs as JSON); default: the built-in `adm_tiny` config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Backends to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,ndarray")]
    pub backends: Vec<Backend>,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Training-step repetitions (ndarray's conv backward is slow: keep this small).
    #[arg(long, default_value_t = 3)]
    pub train_iters: usize,
    /// Skip the training-step benchmark.
    #[arg(long)]
    pub no_train: bool,
    /// Also time FID: the Inception network's images/s at 299x299 (per backend; minutes on
    /// ndarray) and one 2048-d Fréchet distance.
    #[arg(long)]
    pub fid: bool,
    /// Images per Inception call for `--fid`.
    #[arg(long, default_value_t = 8)]
    pub fid_batch: usize,
}

/// The `adm_tiny` architecture of the reference cases: DhariwalUNet, 16x16, 32 channels.
pub const ADM_TINY: &str = include_str!("../configs/networks/adm_tiny.json");

fn inputs(cfg: &EdmConfig, batch: usize, device: &Device) -> (Tensor<4>, Tensor<1>, Option<Tensor<2>>, Tensor<4>) {
    let [c, r] = [cfg.img_channels, cfg.img_resolution];
    let n = batch * c * r * r;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let noise: Vec<f32> = (0..n).map(|i| ((i * 104729 % 1000) as f32 / 500.0) - 1.0).collect();
    let sigma: Vec<f32> = (0..batch).map(|i| 0.002 * (40000f32).powf(i as f32 / batch.max(2) as f32)).collect();
    let labels = (cfg.label_dim > 0).then(|| {
        let l: Vec<f32> = (0..batch * cfg.label_dim).map(|i| if i % cfg.label_dim == (i / cfg.label_dim) % cfg.label_dim { 1.0 } else { 0.0 }).collect();
        Tensor::from_data(TensorData::new(l, [batch, cfg.label_dim]), device)
    });
    (
        Tensor::from_data(TensorData::new(x, [batch, c, r, r]), device),
        Tensor::from_data(TensorData::new(sigma, [batch]), device),
        labels,
        Tensor::from_data(TensorData::new(noise, [batch, c, r, r]), device),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median time of one DMD iteration (generator update with the distribution-matching loss,
/// then a fake-score update) with real score, fake score and generator all of `net`'s shape.
fn dmd_iteration_s(net: &EdmPrecond, backend: Backend, args: &BenchArgs) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!("dmd-bench-{}", std::process::id()));
    let weights = dir.join("teacher.safetensors");
    net.save(&weights)?;
    let cfg: DistillConfig = toml::from_str(&format!(
        "out_dir = \"{}\"\ndevice = \"{backend}\"\n[teacher]\nweights = \"{}\"\n[train]\nbatch_size = {}\n",
        dir.display(),
        weights.display(),
        args.batch
    ))?;
    let mut d = Distiller::new(&cfg, None)?;
    let mut times = Vec::new();
    for step in 0..=args.train_iters.max(1) {
        let t = Instant::now();
        d.step(step)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(median(times))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(p) => EdmConfig::from_json_file(p)?,
        None => EdmConfig::from_json_str(ADM_TINY).context("built-in adm_tiny config")?,
    };
    let name = args.config.as_ref().map_or("adm_tiny".to_string(), |p| p.display().to_string());
    println!("# dmd bench: {name}, {:?}, batch {}, {} threads available", cfg.model_type, args.batch, std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("{:<8} {:>20} {:>22} {:>24}", "backend", "forward (images/s)", "teacher step (ms)", "DMD iteration (ms)");
    for backend in &args.backends {
        let device = backend.device()?;
        let net = EdmPrecond::new(&cfg, &device, 0);
        let (x, sigma, labels, noise) = inputs(&cfg, args.batch, &device);
        let fwd = || {
            let t = Instant::now();
            let out = net.forward(x.clone(), sigma.clone(), labels.clone());
            let _ = out.into_data();
            t.elapsed().as_secs_f64()
        };
        fwd();
        let fwd_s = median((0..args.iters.max(1)).map(|_| fwd()).collect());

        let train_ms = if args.no_train {
            "-".to_string()
        } else {
            let ad = device.clone().autodiff();
            let mut net = assign_ids(EdmPrecond::new(&cfg, &ad, 0), "net");
            let mut optim = AdamConfig::new().init();
            let (x, sigma, labels, noise) = (x.clone().to_device(&ad), sigma.clone().to_device(&ad), labels.clone().map(|l| l.to_device(&ad)), noise.clone().to_device(&ad));
            let mut times = Vec::new();
            for i in 0..=args.train_iters.max(1) {
                let t = Instant::now();
                let loss = edm_loss(&net, x.clone(), labels.clone(), sigma.clone(), noise.clone()).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(1e-4, net, grads);
                ad.sync().ok();
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            format!("{:.1}", median(times) * 1000.0)
        };
        let dmd_ms = if args.no_train { "-".to_string() } else { format!("{:.1}", dmd_iteration_s(&net, *backend, args)? * 1000.0) };
        println!("{:<8} {:>20.1} {:>22} {:>24}", backend.to_string(), args.batch as f64 / fwd_s, train_ms, dmd_ms);
    }
    if args.fid {
        fid_bench(args)?;
    }
    Ok(())
}

/// Inception images/s per backend (the cost does not depend on the weights' values, so the
/// network is all zeros) and the time of one 2048-d Fréchet distance.
fn fid_bench(args: &BenchArgs) -> Result<()> {
    let b = args.fid_batch.max(1);
    println!("{:<8} {:>28}", "backend", format!("inception 299x299 (images/s, batch {b})"));
    for backend in &args.backends {
        let device = backend.device()?;
        let net = FidInception::zeros(&device);
        let px: Vec<f32> = (0..b * 3 * 64 * 64).map(|i| (i * 7919 % 256) as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(px, [b, 3, 64, 64]), &device);
        let run = || {
            let t = Instant::now();
            let _ = net.features_of_pixels(x.clone(), FidPreprocess::Nvidia).into_data();
            t.elapsed().as_secs_f64()
        };
        run();
        let s = median((0..args.iters.clamp(1, 3)).map(|_| run()).collect());
        println!("{:<8} {:>28.2}", backend.to_string(), b as f64 / s);
    }
    // Statistics of 4096 pseudo-random 2048-d features: full rank, like real ones.
    let d = 2048;
    let stats = |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut acc = StatsAccumulator::new(d);
        for _ in 0..8 {
            let f: Vec<f32> = (0..512 * d).map(|_| rng.random::<f32>()).collect();
            acc.add(&f);
        }
        acc.finish()
    };
    let (a, b) = (stats(1)?, stats(2)?);
    let t = Instant::now();
    let fd = frechet_distance(&a, &b)?;
    println!("Frechet distance, 2048-d: {:.2} s (value {fd:.4})", t.elapsed().as_secs_f64());
    Ok(())
}
