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
    /// Network config (EDM kwargs as JSON, as in ../shared/reference/edm/); random weights.
    /// Default: the built-in `adm_tiny` config.
    #[arg(long, alias = "net-config")]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Backends to measure, comma-separated (`--device` is the same option).
    #[arg(long, alias = "device", value_enum, value_delimiter = ',', default_value = "cpu,ndarray")]
    pub backends: Vec<Backend>,
    /// Untimed warm-up repetitions before each measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed repetitions (the median is reported).
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
    /// Time generating one batch at these NFE (1: the one-step generator, one network call;
    /// 2k-1: EDM's Heun sampler with k steps), e.g. `--sampling 1,35,511`; empty: skip.
    #[arg(long, value_delimiter = ',', default_value = "1,35")]
    pub sampling: Vec<usize>,
    /// Also write the numbers as JSON (the first backend's at the top level:
    /// `denoise_fwd_ms`, `teacher_step_ms`, `dmd_step_ms`; every backend under `backends`).
    #[arg(long)]
    pub json: Option<PathBuf>,
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
    for step in 0..args.warmup + args.train_iters.max(1) {
        let t = Instant::now();
        d.step(step)?;
        d.ad.sync().ok();
        if step >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(median(times))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Median wall time of `f` after `warmup` untimed calls.
fn timed_median(warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..iters.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(p) => EdmConfig::from_json_file(p)?,
        None => EdmConfig::from_json_str(ADM_TINY).context("built-in adm_tiny config")?,
    };
    let name = args.config.as_ref().map_or("adm_tiny".to_string(), |p| p.display().to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# dmd bench: {name}, {:?}, batch {}, {threads} threads available; medians of {} after {} warm-up", cfg.model_type, args.batch, args.iters, args.warmup);
    println!("{:<8} {:>14} {:>20} {:>18} {:>20}", "backend", "forward (ms)", "forward (images/s)", "teacher step (ms)", "DMD iteration (ms)");
    let mut per_backend = serde_json::Map::new();
    for backend in &args.backends {
        let device = backend.device()?;
        let net = EdmPrecond::new(&cfg, &device, 0);
        let (x, sigma, labels, noise) = inputs(&cfg, args.batch, &device);
        let fwd_s = timed_median(args.warmup, args.iters, || {
            let _ = net.forward(x.clone(), sigma.clone(), labels.clone()).into_data();
        });

        let train_s = if args.no_train {
            None
        } else {
            let ad = device.clone().autodiff();
            let mut net = Some(assign_ids(EdmPrecond::new(&cfg, &ad, 0), "net"));
            let mut optim = AdamConfig::new().init();
            let (x, sigma, labels, noise) = (x.clone().to_device(&ad), sigma.clone().to_device(&ad), labels.clone().map(|l| l.to_device(&ad)), noise.clone().to_device(&ad));
            Some(timed_median(args.warmup, args.train_iters, || {
                let n = net.take().expect("network");
                let loss = edm_loss(&n, x.clone(), labels.clone(), sigma.clone(), noise.clone()).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &n);
                net = Some(optim.step(1e-4, n, grads));
                ad.sync().ok();
            }))
        };
        let dmd_s = if args.no_train { None } else { Some(dmd_iteration_s(&net, *backend, args)?) };
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.1}", s * 1000.0));
        println!("{:<8} {:>14.1} {:>20.1} {:>18} {:>20}", backend.to_string(), fwd_s * 1000.0, args.batch as f64 / fwd_s, ms(train_s), ms(dmd_s));

        // Generation: the one-step generator is one network call at sigma_max; the teacher
        // runs EDM's Heun sampler (NFE = 2 steps - 1).
        let mut sampling = serde_json::Map::new();
        let z = noise.clone();
        for &nfe in &args.sampling {
            let s = if nfe == 1 {
                timed_median(args.warmup.min(1), args.iters.min(3), || {
                    let _ = crate::distill::generate(&net, z.clone(), labels.clone(), 80.0).into_data();
                })
            } else {
                if nfe % 2 == 0 {
                    anyhow::bail!("--sampling {nfe}: Heun's NFE is odd (2 steps - 1)");
                }
                let cfg = dmd_models::SamplerConfig { num_steps: nfe.div_ceil(2), ..Default::default() };
                let lat = dmd_models::HostTensor::from_tensor(z.clone());
                let lab = labels.clone().map(dmd_models::HostTensor::from_tensor);
                let seeds: Vec<u64> = (0..args.batch as u64).collect();
                timed_median(0, 1, || {
                    let _ = crate::sample::sample_batched(&net, &device, &lat, lab.as_ref(), &cfg, &seeds, args.batch, false);
                })
            };
            sampling.insert(nfe.to_string(), serde_json::json!(s * 1000.0));
        }
        if !args.sampling.is_empty() {
            let one = sampling.get("1").and_then(|v| v.as_f64());
            let line: Vec<String> = sampling
                .iter()
                .map(|(k, v)| {
                    let ms = v.as_f64().unwrap_or(0.0);
                    match (one, k.as_str()) {
                        (Some(o), k) if k != "1" => format!("{k} NFE {ms:.1} ms ({:.1}x the one-step time)", ms / o),
                        _ => format!("{k} NFE {ms:.1} ms"),
                    }
                })
                .collect();
            println!("{:<8} generation of a batch: {}", backend.to_string(), line.join(", "));
        }
        per_backend.insert(
            backend.to_string(),
            serde_json::json!({
                "denoise_fwd_ms": fwd_s * 1000.0,
                "denoise_images_per_s": args.batch as f64 / fwd_s,
                "teacher_step_ms": train_s.map(|s| s * 1000.0),
                "dmd_step_ms": dmd_s.map(|s| s * 1000.0),
                "generation_ms_per_batch_by_nfe": sampling,
            }),
        );
    }
    let peak = peak_rss_mib();
    if let Some(p) = peak {
        println!("peak resident memory of this process: {p:.0} MiB");
    }
    if args.fid {
        fid_bench(args)?;
    }
    if let Some(path) = &args.json {
        let mut top = per_backend.values().next().cloned().unwrap_or_default();
        if let Some(obj) = top.as_object_mut() {
            obj.insert("backend".into(), serde_json::json!(args.backends.first().map(|b| b.to_string())));
            obj.insert("net_config".into(), serde_json::json!(name));
            obj.insert("batch".into(), serde_json::json!(args.batch));
            obj.insert("warmup".into(), serde_json::json!(args.warmup));
            obj.insert("iters".into(), serde_json::json!(args.iters));
            obj.insert("train_iters".into(), serde_json::json!(args.train_iters));
            obj.insert("threads".into(), serde_json::json!(threads));
            obj.insert("machine".into(), serde_json::json!(crate::experiment::machine()));
            obj.insert("git_commit".into(), serde_json::json!(crate::experiment::git_commit()));
            obj.insert("peak_rss_mib".into(), serde_json::json!(peak));
            obj.insert("backends".into(), serde_json::Value::Object(per_backend));
        }
        dmd_models::weights::write_atomic(path, serde_json::to_string_pretty(&top)?.as_bytes())?;
        println!("wrote {}", path.display());
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
