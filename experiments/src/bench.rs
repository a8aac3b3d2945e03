//! `dmd bench`: speed of the denoiser forward pass (images/s), one teacher training step
//! (forward + backward + Adam) and one DMD iteration per backend; with `--fid`, the Inception
//! network's images/s and a 2048-d Fréchet distance. Numbers are printed, never asserted.

use crate::device::Backend;
use crate::distill::{DistillConfig, Distiller};
use crate::parallel::{run_replicas, Replica};
use crate::fid::{frechet_distance, StatsAccumulator};
use dmd_models::inception::{FidInception, FidPreprocess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use dmd_losses::edm::edm_loss;
use dmd_models::weights::assign_ids;
use dmd_models::{EdmConfig, EdmPrecond, HostTensor};
use std::path::{Path, PathBuf};
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
    /// Time the DMD iteration as this many data-parallel replicas of `batch / replicas` each
    /// (`train.devices`; on the CPU backends threads sharing the one device, see README
    /// "Scale-out"; on CUDA GPUs 0..replicas). The batch stays the global one.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Run the network body (everything between EDM's input and output scalings) in bf16,
    /// as DMD2's mixed precision does; parameters and optimiser state stay float32.
    #[arg(long)]
    pub bf16: bool,
    /// Also time the network's building blocks alone (3x3 convolutions, group norm, SiLU,
    /// attention, 2x resampling) at the shapes they meet in it: forward, and forward + backward.
    /// With `--bf16` they run in bf16, and each also reports the relative L2 errors of its
    /// output, input gradient and weight gradient, computed on the device in float32 and in
    /// bf16, against float32 on the CPU.
    #[arg(long)]
    pub ops: bool,
    /// Before timing, check each backend against the official EDM outputs in this folder
    /// (`../shared/reference/edm`: denoiser and 18-step Heun sampler of `adm_tiny` and
    /// `ddpmpp_tiny`) and report the relative L2 errors (a correct float32 port: below 1e-5).
    #[arg(long)]
    pub check_reference: Option<PathBuf>,
    /// Also write the numbers as JSON (the first backend's at the top level:
    /// `denoise_fwd_ms`, `teacher_step_ms`, `dmd_step_ms`; every backend under `backends`).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Text-to-image instead: per-image wall time of a one-step generator vs the teacher's
    /// 50-step PNDM with guidance (51 steps, 102 UNet calls) for this Stable Diffusion folder, text
    /// encoding and VAE decoding included (`--batch` images per call).
    #[arg(long)]
    pub sd: Option<PathBuf>,
    /// With `--sd`: the one-step generator folder (default: the teacher's UNet, same cost).
    #[arg(long)]
    pub sd_generator: Option<PathBuf>,
    /// With `--sd`: the teacher's PNDM steps.
    #[arg(long, default_value_t = 50)]
    pub sd_steps: usize,
}

/// `dmd bench --sd`: one-step generation vs the teacher's guided PNDM, per backend.
fn run_txt2img(args: &BenchArgs, sd_dir: &Path) -> Result<()> {
    println!("# dmd bench --sd {}: ms per image, batch {}, median of {} after 1 warm-up", sd_dir.display(), args.batch, args.iters.max(1));
    println!("{:<8} {:>16} {:>22} {:>10} {:>12}", "backend", "one-step (ms)", "teacher PNDM (ms)", "speed-up", "UNet calls");
    let mut per_backend = serde_json::Map::new();
    for &backend in &args.backends {
        let device = backend.device()?;
        let sd = dmd_models::sd::pipeline::StableDiffusion::load(sd_dir, &device)?;
        let t = crate::txt2img::time_txt2img(&sd, args.sd_generator.as_deref(), args.sd_steps, 3.0, args.batch, args.iters.max(1))?;
        let speedup = t.teacher_ms / t.one_step_ms;
        println!("{:<8} {:>16.1} {:>22.1} {:>9.1}x {:>12}", backend.to_string(), t.one_step_ms, t.teacher_ms, speedup, t.teacher_unet_calls);
        per_backend.insert(
            backend.to_string(),
            serde_json::json!({
                "one_step_ms_per_image": t.one_step_ms,
                "teacher_pndm_ms_per_image": t.teacher_ms,
                "teacher_unet_calls": t.teacher_unet_calls,
                "speedup": speedup,
            }),
        );
    }
    if let Some(path) = &args.json {
        let out = serde_json::json!({ "sd": sd_dir.display().to_string(), "batch": args.batch, "pndm_steps": args.sd_steps, "guidance": 3.0, "backends": per_backend });
        dmd_models::weights::write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
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

/// The distillation `dmd bench` times: `net` (its weights saved under a temporary folder,
/// which the caller removes) as the teacher, DMD's defaults otherwise. Returns the config and
/// the folder.
pub fn bench_distill_config(net: &EdmPrecond, backend: Backend, batch: usize, replicas: usize, bf16: bool) -> Result<(DistillConfig, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("dmd-bench-{}", std::process::id()));
    let weights = dir.join("teacher.safetensors");
    net.save(&weights)?;
    let cfg: DistillConfig = toml::from_str(&format!(
        "out_dir = \"{}\"\ndevice = \"{backend}\"\n[teacher]\nweights = \"{}\"\n[train]\nbatch_size = {batch}\ndevices = {replicas}\nbf16_body = {bf16}\n",
        dir.display(),
        weights.display(),
    ))?;
    cfg.validate()?;
    Ok((cfg, dir))
}

/// Median time of one DMD iteration (generator update with the distribution-matching loss,
/// then a fake-score update) with real score, fake score and generator all of `net`'s shape.
fn dmd_iteration_s(net: &EdmPrecond, backend: Backend, args: &BenchArgs) -> Result<f64> {
    let (cfg, dir) = bench_distill_config(net, backend, args.batch, args.replicas, args.bf16)?;
    // The main replica's step time is the iteration's: it includes waiting for the others' sums.
    let mut replicas = Replica::group(backend, args.replicas)?;
    let (main, device) = replicas.remove(0);
    let mut d = Distiller::replica(&cfg, None, main.clone(), device)?;
    let steps = args.warmup + args.train_iters.max(1);
    let mut times = Vec::new();
    run_replicas(
        &main,
        || {
            for step in 0..steps {
                let t = Instant::now();
                d.step(step)?;
                d.ad.sync().ok();
                if step >= args.warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok(())
        },
        replicas,
        |r, device| {
            let mut d = Distiller::replica(&cfg, None, r.clone(), device)?;
            (0..steps).try_for_each(|step| d.step(step).map(|_| ()))
        },
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(median(times))
}

/// A network building block on one device: input -> output, its parameters made once.
type Block = Box<dyn Fn(Tensor<4>) -> Tensor<4>>;

/// One building block's median times (s) and, when timed in bf16, the relative L2 errors of
/// its output, input gradient and weight gradient (if it has a weight) against float32 on the
/// CPU (flex: exact float32, where a GPU's float32 products may use TF32), computed on this
/// device in float32 and in bf16.
struct OpRow {
    name: String,
    forward_s: f64,
    forward_backward_s: f64,
    errors: Option<OpErrors>,
}

/// [output, input gradient, weight gradient] relative L2 errors against the CPU's float32.
struct OpErrors {
    f32: [Option<f64>; 3],
    bf16: [Option<f64>; 3],
}

/// Relative L2 distance of `a` from `b` (host copies, float64 sums).
fn rel_l2_host(a: &HostTensor, b: &HostTensor) -> f64 {
    let num: f64 = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.data.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Median times (s) of forward and of forward + backward (gradients for the input and the
/// block's parameters, the upstream gradient a fixed random tensor) of the building blocks of
/// an ADM/DDPM++ network at the shapes `cfg` gives them: model_channels at full resolution,
/// twice that at half resolution (where adm_tiny has its attention), plus the convolutions
/// with few channels (the network's first and last, image channels in or out, and first
/// convolutions of 1, 4 and 8 channels: few input channels take other weight-gradient kernels
/// on CUDA), a 3x3 one with a bias and a strided 4x4 one (DMD2's GAN head). With `bf16`, inputs and weights are bf16 (as in a bf16 network
/// body) and each row also gets its errors in float32 and in bf16 against the CPU's float32
/// (a wrong or low-precision kernel shows there).
fn op_breakdown(cfg: &EdmConfig, batch: usize, device: &Device, warmup: usize, iters: usize, bf16: bool) -> Vec<OpRow> {
    use burn::tensor::FloatDType;
    use dmd_models::nn::{attention, avg_pool_2x2, conv2d_dense, silu, GroupNorm, Init};
    let (c, r) = (cfg.model_channels(), cfg.img_resolution);
    let (c2, r2) = (2 * c, (r / 2).max(1));
    let heads = (c2 / 64).max(1);
    let random = |shape: Vec<usize>, seed: u64, dev: &Device| {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), dev)
    };
    let dtype_of = |half: bool| if half { FloatDType::BF16 } else { FloatDType::F32 };
    // (device, track gradients, bf16) -> the block and its weight (if any; its gradient is
    // measured too).
    type Make = Box<dyn Fn(&Device, bool, bool) -> (Block, Option<Tensor<4>>)>;
    // A convolution of `ci` -> `co` channels, k x k, padding k / 2 (1 for the 4x4).
    let conv = move |ci: usize, co: usize, k: usize, stride: usize| -> Make {
        Box::new(move |dev: &Device, track: bool, half: bool| {
            let w = random(vec![co, ci, k, k], 7, dev).cast(dtype_of(half));
            let w = if track { w.require_grad() } else { w };
            let wb = w.clone();
            let pad = if k == 4 { 1 } else { k / 2 };
            (Box::new(move |x| conv2d_dense(x, wb.clone(), None, stride, [pad, pad])), Some(w))
        })
    };
    // The same 3x3 convolution with a bias (on CUDA in the implicit-GEMM kernel's epilogue).
    let conv_bias = move |ci: usize, co: usize| -> Make {
        Box::new(move |dev: &Device, track: bool, half: bool| {
            let w = random(vec![co, ci, 3, 3], 7, dev).cast(dtype_of(half));
            let w = if track { w.require_grad() } else { w };
            let bias = random(vec![1, 1, 1, co], 5, dev).cast(dtype_of(half)).reshape([co]);
            let wb = w.clone();
            (Box::new(move |x| conv2d_dense(x, wb.clone(), Some(bias.clone()), 1, [1, 1])), Some(w))
        })
    };
    let img = cfg.img_channels;
    // Input convolutions of the other data this project trains on (1: Fashion-MNIST, 4: SD
    // latents) beside this network's: few channels take other kernels on CUDA.
    let other_inputs: Vec<usize> = [1, 4, 8].into_iter().filter(|&ci| ci != img).collect();
    let mut cases: Vec<(String, [usize; 4], Make)> = vec![
        (format!("conv3x3 {c}->{c} at {r}x{r}"), [batch, c, r, r], conv(c, c, 3, 1)),
        (format!("conv3x3 {c}->{c} at {r}x{r} with bias"), [batch, c, r, r], conv_bias(c, c)),
        (format!("conv3x3 {c2}->{c2} at {r2}x{r2}"), [batch, c2, r2, r2], conv(c2, c2, 3, 1)),
        (format!("conv1x1 {c2}->{} at {r2}x{r2} (qkv)", 3 * c2), [batch, c2, r2, r2], conv(c2, 3 * c2, 1, 1)),
        (format!("conv3x3 {img}->{c} at {r}x{r} (input)"), [batch, img, r, r], conv(img, c, 3, 1)),
        (format!("conv3x3 {c}->{img} at {r}x{r} (output)"), [batch, c, r, r], conv(c, img, 3, 1)),
        (format!("conv4x4 stride 2 {c2}->{c2} at {r2}x{r2}"), [batch, c2, r2, r2], conv(c2, c2, 4, 2)),
        (
            format!("group_norm {c} ch at {r}x{r}"),
            [batch, c, r, r],
            Box::new(move |dev: &Device, _, _| {
                let gn = GroupNorm::new(&mut Init::new(dev, 0), c, 1e-5);
                (Box::new(move |x| gn.forward(x)), None)
            }),
        ),
        (format!("silu {c} ch at {r}x{r}"), [batch, c, r, r], Box::new(|_: &Device, _, _| (Box::new(silu) as Block, None))),
        (
            format!("group_norm+silu+scale {c} ch at {r}x{r}"),
            [batch, c, r, r],
            Box::new(move |dev: &Device, _, half: bool| {
                let gn = GroupNorm::new(&mut Init::new(dev, 0), c, 1e-5);
                // EDM's adaptive scale and shift, [N, 2C].
                let modulation = random(vec![batch, 2 * c, 1, 1], 3, dev).cast(dtype_of(half)).reshape([batch, 2 * c]);
                (Box::new(move |x| gn.forward_silu(x, Some(modulation.clone()))), None)
            }),
        ),
        (
            format!("attention {heads} head(s), {c2} ch at {r2}x{r2}"),
            [batch, 3 * c2, r2, r2],
            Box::new(move |_: &Device, _, _| (Box::new(move |qkv: Tensor<4>| attention(qkv, heads)) as Block, None)),
        ),
        (
            format!("downsample 2x2 average, {c} ch at {r}x{r}"),
            [batch, c, r, r],
            Box::new(|_: &Device, _, _| (Box::new(avg_pool_2x2) as Block, None)),
        ),
    ];
    for ci in other_inputs.into_iter().rev() {
        cases.insert(5, (format!("conv3x3 {ci}->{c} at {r}x{r} (input)"), [batch, ci, r, r], conv(ci, c, 3, 1)));
    }
    let ad = device.clone().autodiff();
    // Output, input gradient and weight gradient (float32 copies on the host) of one
    // forward + backward on `dev` (autodiff), every input drawn from the same seeds on each device.
    let results = |make: &Make, shape: [usize; 4], out_shape: &[usize], dev: &Device, half: bool| {
        let (block, w) = make(dev, true, half);
        let x = random(shape.to_vec(), 1, dev).cast(dtype_of(half)).require_grad();
        let y = block(x.clone());
        let upstream = random(out_shape.to_vec(), 2, dev).cast(dtype_of(half));
        let grads = (y.clone() * upstream).sum().backward();
        let host = |t: Tensor<4>| HostTensor::from_tensor(t.cast(FloatDType::F32));
        let gw = w.and_then(|w| w.grad(&grads)).map(host);
        [Some(host(y.inner())), x.grad(&grads).map(host), gw]
    };
    let cpu = Device::flex().autodiff();
    let mut rows = Vec::new();
    for (name, shape, make) in cases {
        let (plain, _) = make(device, false, bf16);
        let x = random(shape.to_vec(), 1, device).cast(dtype_of(bf16));
        let fwd = timed_median(warmup, iters, || {
            let _ = plain(x.clone()).into_data();
        });
        let (tracked, _) = make(&ad, true, bf16);
        let x_ad = random(shape.to_vec(), 1, &ad).cast(dtype_of(bf16)).require_grad();
        let out_shape = tracked(x_ad.clone()).detach().dims();
        let upstream = random(out_shape.to_vec(), 2, &ad).cast(dtype_of(bf16));
        let fwd_bwd = timed_median(warmup, iters, || {
            let grads = (tracked(x_ad.clone()) * upstream.clone()).sum().backward();
            let _ = x_ad.grad(&grads).map(|g| g.into_data());
        });
        let errors = bf16.then(|| {
            let want = results(&make, shape, &out_shape, &cpu, false);
            let against = |got: [Option<HostTensor>; 3]| -> [Option<f64>; 3] {
                std::array::from_fn(|i| got[i].as_ref().zip(want[i].as_ref()).map(|(g, w)| rel_l2_host(g, w)))
            };
            OpErrors { f32: against(results(&make, shape, &out_shape, &ad, false)), bf16: against(results(&make, shape, &out_shape, &ad, true)) }
        });
        rows.push(OpRow { name, forward_s: fwd, forward_backward_s: fwd_bwd, errors });
    }
    rows
}

/// Memory a DMD run holds whatever the batch, GiB: float32 weights of the real score, fake
/// score and generator, plus gradients and two AdamW moments for each of the two trained ones.
fn static_gib(params: usize) -> f64 {
    (3 + 2 * 3) as f64 * 4.0 * params as f64 / (1u64 << 30) as f64
}

/// Relative L2 errors against the official EDM outputs: (case, error) for the denoiser and
/// the 18-step Heun sampler of each reference network.
fn check_reference(dir: &std::path::Path, device: &Device) -> Result<Vec<(String, f64)>> {
    use dmd_models::{sample, NamedTensors, NetDenoiser, SamplerConfig};
    let mut out = Vec::new();
    for name in ["adm_tiny", "ddpmpp_tiny"] {
        let cases_path = dir.join(format!("{name}_cases.safetensors"));
        let cases = NamedTensors::read(&cases_path)?;
        let get = |k: &str| cases.get(k).with_context(|| format!("{}: no tensor `{k}`", cases_path.display()));
        let net = EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), device, "reference")?;
        let x = get("denoise_x")?.to_tensor::<4>(device);
        let sigma = get("denoise_sigma")?.to_tensor::<1>(device);
        let labels = get("denoise_labels")?.to_tensor::<2>(device);
        let denoised = HostTensor::from_tensor(net.forward(x, sigma, Some(labels)));
        out.push((format!("{name}.denoise_out"), rel_l2_host(&denoised, get("denoise_out")?)));
        let denoiser = NetDenoiser { net: &net, device: device.clone() };
        let samples = sample(&denoiser, get("sample_latents")?, Some(get("sample_labels")?), &SamplerConfig::default(), &mut [], |_| {});
        out.push((format!("{name}.sample_out"), rel_l2_host(&samples, get("sample_out")?)));
    }
    Ok(out)
}

/// Wall time of the sampler at each NFE over the one-step generator's (the NFE ratio is the
/// ideal: both make one batch, and one network call costs the same in either).
fn speedups(by_nfe: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let one = by_nfe.get("1").and_then(|v| v.as_f64());
    let map: serde_json::Map<String, serde_json::Value> = by_nfe
        .iter()
        .filter(|(k, _)| k.as_str() != "1")
        .filter_map(|(k, v)| Some((k.clone(), serde_json::json!(v.as_f64()? / one?))))
        .collect();
    serde_json::Value::Object(map)
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
    if let Some(dir) = &args.sd {
        return run_txt2img(args, dir);
    }
    let cfg = match &args.config {
        Some(p) => EdmConfig::from_json_file(p)?,
        None => EdmConfig::from_json_str(ADM_TINY).context("built-in adm_tiny config")?,
    };
    let name = args.config.as_ref().map_or("adm_tiny".to_string(), |p| p.display().to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let precision = if args.bf16 { "bf16 body" } else { "float32" };
    println!("# dmd bench: {name}, {:?}, batch {}, {precision}, {threads} threads available; medians of {} after {} warm-up", cfg.model_type, args.batch, args.iters, args.warmup);
    if args.replicas > 1 {
        println!("# DMD iteration as {} data-parallel replicas of {} images each", args.replicas, args.batch as f64 / args.replicas as f64);
    }
    println!("{:<8} {:>14} {:>20} {:>18} {:>20}", "backend", "forward (ms)", "forward (images/s)", "teacher step (ms)", "DMD iteration (ms)");
    let mut per_backend = serde_json::Map::new();
    let mut reference = serde_json::Map::new();
    let mut params = None;
    if let Some(dir) = &args.check_reference {
        for backend in &args.backends {
            let errors = check_reference(dir, &backend.device()?)?;
            for (case, err) in &errors {
                println!("{:<8} reference {case}: relative L2 error {err:.2e}{}", backend.to_string(), if *err < 1e-5 { "" } else { "  <-- above 1e-5" });
            }
            reference.insert(backend.to_string(), serde_json::json!(errors.into_iter().map(|(k, v)| (k, serde_json::json!(v))).collect::<serde_json::Map<_, _>>()));
        }
    }
    for backend in &args.backends {
        let device = backend.device()?;
        // Its weights where a loaded network's are (CubeCL's persistent pool on CUDA).
        let net = dmd_models::weights::into_persistent_pool(EdmPrecond::new(&cfg, &device, 0).with_bf16_body(args.bf16));
        let conv = backend.conv_impl()?;
        let cube_kernels = dmd_models::nn::cube_kernels(&device);
        println!("# {backend}: convolutions {conv:?}{}", if cube_kernels { ", this project's CubeCL kernels (group norm, attention, SiLU, conv bias, Adam, EMA)" } else { "" });
        if params.is_none() {
            params = Some(net.num_params());
            println!("# {:.1}M parameters; a DMD run's weights, gradients and AdamW moments: {:.2} GiB before activations", net.num_params() as f64 / 1e6, static_gib(net.num_params()));
        }
        let (x, sigma, labels, noise) = inputs(&cfg, args.batch, &device);
        let fwd_s = timed_median(args.warmup, args.iters, || {
            let _ = net.forward(x.clone(), sigma.clone(), labels.clone()).into_data();
        });

        let train_s = if args.no_train {
            None
        } else {
            let ad = device.clone().autodiff();
            let mut net = Some(assign_ids(EdmPrecond::new(&cfg, &ad, 0), "net").with_bf16_body(args.bf16));
            // Burn's Adam defaults (betas 0.9 / 0.999, epsilon 1e-5).
            let mut optim = crate::optim::adam(0.9, 0.999, 1e-5);
            let (x, sigma, labels, noise) = (x.clone().to_device(&ad), sigma.clone().to_device(&ad), labels.clone().map(|l| l.to_device(&ad)), noise.clone().to_device(&ad));
            // The step in three timed parts, synchronised between them: the loss's forward (with
            // the autodiff graph), its backward, and the optimiser's update (launch-bound on a
            // GPU: a few kernels per parameter tensor). Each part's host time (until its calls
            // return, before waiting for the device) is kept too: on a GPU, a part whose host
            // time is close to its whole time keeps the device waiting for launches.
            let mut parts = Vec::new();
            let total = timed_median(args.warmup, args.train_iters, || {
                let mut marks = [0.0; 6];
                let t = Instant::now();
                let mut mark = |i: usize, sync: bool| {
                    if sync {
                        ad.sync().ok();
                    }
                    marks[i] = t.elapsed().as_secs_f64();
                };
                let n = net.take().expect("network");
                let loss = edm_loss(&n, x.clone(), labels.clone(), sigma.clone(), noise.clone()).mean();
                mark(0, false);
                mark(1, true);
                let grads = GradientsParams::from_grads(loss.backward(), &n);
                mark(2, false);
                mark(3, true);
                net = Some(optim.step(1e-4, n, grads));
                mark(4, false);
                mark(5, true);
                let m = marks;
                parts.push([[m[1], m[3] - m[1], m[5] - m[3]], [m[0], m[2] - m[1], m[4] - m[3]]]);
            });
            let parts = parts.split_off(parts.len().saturating_sub(args.train_iters.max(1)));
            let split = |k: usize| [0, 1, 2].map(|i| median(parts.iter().map(|p| p[k][i]).collect()));
            Some((total, split(0), split(1)))
        };
        let (train_s, train_split, train_host) = match train_s {
            Some((total, split, host)) => (Some(total), Some(split), Some(host)),
            None => (None, None, None),
        };
        let dmd_s = if args.no_train { None } else { Some(dmd_iteration_s(&net, *backend, args)?) };
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.1}", s * 1000.0));
        println!("{:<8} {:>14.1} {:>20.1} {:>18} {:>20}", backend.to_string(), fwd_s * 1000.0, args.batch as f64 / fwd_s, ms(train_s), ms(dmd_s));
        if let (Some([fwd, bwd, update]), Some([h_fwd, h_bwd, h_update])) = (train_split, train_host) {
            println!("{:<8} teacher step: loss forward {:.1} ms + backward {:.1} ms, Adam update {:.1} ms", backend.to_string(), fwd * 1000.0, bwd * 1000.0, update * 1000.0);
            println!("{:<8} of which host time until the calls return: {:.1} + {:.1} ms, {:.1} ms", "", h_fwd * 1000.0, h_bwd * 1000.0, h_update * 1000.0);
        }

        // Generation: the one-step generator is one network call at sigma_max; the teacher
        // runs EDM's Heun sampler (NFE = 2 steps - 1). On CUDA the one-step time after the
        // training steps above was ~3x the forward's before them (results/bench/cuda/README.md);
        // DMD_BENCH_CLEANUP=1 releases CubeCL's unused pool memory first, to test whether the
        // pools' state is why.
        if std::env::var("DMD_BENCH_CLEANUP").is_ok_and(|v| v == "1") {
            device.sync().ok();
            dmd_models::fused_update::release_unused_memory(&device);
        }
        let mut sampling = serde_json::Map::new();
        let z = noise.clone();
        for &nfe in &args.sampling {
            // The one-step time is measured like the forward pass above (same warm-up and
            // repetitions), so its ratio to the sampler's time is not skewed by noise.
            let s = if nfe == 1 {
                timed_median(args.warmup, args.iters, || {
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
                        (Some(o), k) if k != "1" => format!("{k} NFE {ms:.1} ms ({:.1}x the one-step time; NFE ratio {k})", ms / o),
                        _ => format!("{k} NFE {ms:.1} ms"),
                    }
                })
                .collect();
            println!("{:<8} generation of a batch: {}", backend.to_string(), line.join(", "));
        }
        let ops = if args.ops {
            let rows = op_breakdown(&cfg, args.batch, &device, args.warmup, args.iters, args.bf16);
            let errors_header = if args.bf16 { "  rel. L2 vs the CPU's float32 (output / input grad / weight grad): float32 | bf16" } else { "" };
            println!("{:<8} {:<40} {:>14} {:>22}{errors_header}", backend.to_string(), "building block", "forward (ms)", "forward+backward (ms)");
            let fmt = |e: &[Option<f64>; 3]| e.map(|e| e.map_or("-".to_string(), |e| format!("{e:.1e}"))).join(" / ");
            for row in &rows {
                let errors = row.errors.as_ref().map_or(String::new(), |e| format!("  {} | {}", fmt(&e.f32), fmt(&e.bf16)));
                println!("{:<8} {:<40} {:>14.2} {:>22.2}{errors}", "", row.name, row.forward_s * 1000.0, row.forward_backward_s * 1000.0);
            }
            let json = |e: &[Option<f64>; 3]| serde_json::json!({ "output": e[0], "input_grad": e[1], "weight_grad": e[2] });
            let map: serde_json::Map<String, serde_json::Value> = rows
                .into_iter()
                .map(|row| {
                    let mut v = serde_json::json!({ "forward_ms": row.forward_s * 1000.0, "forward_backward_ms": row.forward_backward_s * 1000.0 });
                    if let Some(e) = &row.errors {
                        v["rel_l2_vs_cpu_f32"] = serde_json::json!({ "f32": json(&e.f32), "bf16": json(&e.bf16) });
                    }
                    (row.name, v)
                })
                .collect();
            Some(serde_json::Value::Object(map))
        } else {
            None
        };
        per_backend.insert(
            backend.to_string(),
            serde_json::json!({
                "ops": ops,
                "conv": conv,
                "cube_kernels": cube_kernels,
                "denoise_fwd_ms": fwd_s * 1000.0,
                "denoise_images_per_s": args.batch as f64 / fwd_s,
                "teacher_step_ms": train_s.map(|s| s * 1000.0),
                "teacher_step_forward_backward_ms": train_split.map(|p| (p[0] + p[1]) * 1000.0),
                "teacher_step_forward_ms": train_split.map(|p| p[0] * 1000.0),
                "teacher_step_backward_ms": train_split.map(|p| p[1] * 1000.0),
                "teacher_step_update_ms": train_split.map(|p| p[2] * 1000.0),
                "teacher_step_host_ms": train_host.map(|p| serde_json::json!({"forward": p[0] * 1000.0, "backward": p[1] * 1000.0, "update": p[2] * 1000.0})),
                "dmd_step_ms": dmd_s.map(|s| s * 1000.0),
                "generation_speedup_of_one_step_by_nfe": speedups(&sampling),
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
            obj.insert("bf16_body".into(), serde_json::json!(args.bf16));
            obj.insert("dmd_step_replicas".into(), serde_json::json!(args.replicas));
            obj.insert(
                "build_features".into(),
                serde_json::json!({"cuda": cfg!(feature = "cuda"), "cuda_fusion": cfg!(feature = "cuda-fusion"), "cuda_autotune": cfg!(feature = "cuda-autotune")}),
            );
            obj.insert("parameters".into(), serde_json::json!(params));
            obj.insert("dmd_static_memory_gib".into(), serde_json::json!(params.map(static_gib)));
            obj.insert("machine".into(), serde_json::json!(crate::experiment::machine()));
            obj.insert("git_commit".into(), serde_json::json!(crate::experiment::git_commit()));
            obj.insert("peak_rss_mib".into(), serde_json::json!(peak));
            obj.insert("backends".into(), serde_json::Value::Object(per_backend));
            if !reference.is_empty() {
                obj.insert("reference_rel_l2".into(), serde_json::Value::Object(reference));
            }
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
