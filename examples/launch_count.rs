//! Kernel launches of one training step on CubeCL's CPU runtime, per kind of kernel: without a
//! GPU, a measure of what the CUDA build launches (on an H100 each launch cost ~30 us, most of
//! the training step; results/bench/cuda/README.md).
//!
//! ```sh
//! scripts/prepare-cuda-build.sh
//! CARGO_TARGET_DIR=target/cubecpu cargo run --release --features cube-cpu --example launch_count -- \
//!     [NET.json] [--step net|teacher|dmd] [--batch N] [--conv gemm|native]
//! ```
//!
//! `--step`: `net` (default), one forward + backward of the network (a mean-square loss, no
//! parameter update); `teacher`, one teacher training step as `dmd bench` times it (EDM's loss,
//! forward + backward, the fused Adam update); `dmd`, one DMD iteration as `dmd bench` times it
//! (`Distiller::step` with DMD's defaults: the generator's update through the real and fake
//! scores, then the fake score's denoising update, with their AdamW updates and the losses'
//! read-backs).
//!
//! NET.json defaults to `experiments/configs/networks/adm_tiny.json`, the batch to 2, the
//! convolution to `gemm` (CUDA's default; the CPU runtime has no implicit-GEMM kernel, so Burn's
//! direct kernels run behind it, whose weight gradient makes copies the CUDA kernel does not).
//! The program runs itself again with CubeCL's profiling log on stderr
//! (`CUBECL_DEBUG_LOG=stderr CUBECL_DEBUG_OPTION=profile`), which names every kernel launched,
//! and counts the second of two passes (the first compiles the kernels).

fn main() {
    if std::env::var_os(CHILD).is_some() {
        return measure();
    }
    let args: Vec<String> = std::env::args().collect();
    let output = std::process::Command::new(&args[0])
        .args(&args[1..])
        .env(CHILD, "1")
        .env("CUBECL_DEBUG_LOG", "stderr")
        .env("CUBECL_DEBUG_OPTION", "profile")
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", args[0])));
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprint!("{log}");
        fail("the measuring run failed");
    }
    report(&log);
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

const CHILD: &str = "DMD_LAUNCH_COUNT_CHILD";
const MARK: &str = "@@@ launch_count ";

/// The launches logged between the markers of the second pass, by kernel, printed as a table.
fn report(log: &str) {
    let mut phase: Option<&str> = None;
    let mut counts: Vec<(String, std::collections::BTreeMap<String, usize>)> = Vec::new();
    for line in log.lines() {
        if let Some(name) = line.strip_prefix(MARK) {
            phase = (name != "end" && name != "warm-up").then_some(name);
            if let Some(name) = phase {
                counts.push((name.to_string(), Default::default()));
            }
        } else if let (Some(_), Some(kernel)) = (phase, kernel_name(line)) {
            *counts.last_mut().expect("a phase").1.entry(kernel).or_default() += 1;
        }
    }
    if counts.is_empty() {
        fail("no launches found in CubeCL's log");
    }
    let mut total: std::collections::BTreeMap<String, usize> = Default::default();
    for (name, kernels) in &counts {
        println!("{name}: {} launches", kernels.values().sum::<usize>());
        for (kernel, n) in kernels {
            *total.entry(kernel.clone()).or_default() += n;
        }
    }
    let mut rows: Vec<(usize, String)> = total.into_iter().map(|(k, n)| (n, k)).collect();
    rows.sort_by(|a, b| b.cmp(a));
    println!("total: {} launches", rows.iter().map(|r| r.0).sum::<usize>());
    println!("{:>6}  kernel", "count");
    for (n, kernel) in rows {
        println!("{n:>6}  {kernel}");
    }
}

/// The kernel of a profiling line (`| 12.3µs | KernelBinop | AddOp_1a2b3c4d`), without the
/// hash of its compiled variant; `None` for other lines.
fn kernel_name(line: &str) -> Option<String> {
    let mut fields = line.strip_prefix("| ")?.split(" | ").map(str::trim);
    let duration = fields.next()?;
    if !duration.ends_with('s') || !duration.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    // The first two fields: the kernel and its operation (a matrix product's are its whole
    // configuration).
    let parts: Vec<&str> = fields.take(2).map(|f| f.rsplit_once('_').filter(|(_, h)| h.len() == 8 && h.chars().all(|c| c.is_ascii_hexdigit())).map_or(f, |(k, _)| k)).collect();
    (!parts.is_empty()).then(|| parts.join(" | "))
}

/// What to count (`--step`).
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Net,
    Teacher,
    Dmd,
}

fn measure() {
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};
    use dmd_experiments::device::Backend;
    use dmd_experiments::bench::bench_distill_config;
    use dmd_experiments::distill::Distiller;
    use dmd_models::config::EdmConfig;
    use dmd_models::nn::{set_conv_impl, ConvImpl};
    use dmd_models::precond::EdmPrecond;
    use dmd_models::weights::assign_ids;

    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut net = "experiments/configs/networks/adm_tiny.json".to_string();
    let (mut batch, mut conv, mut step) = (2usize, ConvImpl::Gemm, Step::Net);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--batch" => batch = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| fail("--batch takes a number")),
            "--conv" => {
                conv = match it.next().map(String::as_str) {
                    Some("gemm") => ConvImpl::Gemm,
                    Some("native") => ConvImpl::Native,
                    _ => fail("--conv takes gemm or native"),
                }
            }
            "--step" => {
                step = match it.next().map(String::as_str) {
                    Some("net") => Step::Net,
                    Some("teacher") => Step::Teacher,
                    Some("dmd") => Step::Dmd,
                    _ => fail("--step takes net, teacher or dmd"),
                }
            }
            path => net = path.to_string(),
        }
    }
    let config = EdmConfig::from_json_file(std::path::Path::new(&net)).unwrap_or_else(|e| fail(&e.to_string()));
    let device: Device = Backend::CubeCpu.device().unwrap_or_else(|e| fail(&e.to_string()));
    set_conv_impl(conv);
    let ad = device.clone().autodiff();
    let sync = |tag: &str| {
        ad.sync().unwrap_or_else(|e| fail(&format!("device: {e:?}")));
        eprintln!("{MARK}{tag}");
    };
    let phase = |pass: usize, tag: &'static str| if pass == 1 { tag } else { "warm-up" };
    let network = assign_ids(EdmPrecond::new(&config, &ad, 0), "net");
    let [c, h, w] = network.image_shape();
    let labels = config.label_dim;
    // Inputs from the host, so that no random-number kernel counts.
    let values = |len: usize, scale: f32| (0..len).map(|i| scale * ((i * 7919 % 1000) as f32 / 1000.0 + 0.1)).collect::<Vec<f32>>();
    let x = Tensor::<4>::from_data(TensorData::new(values(batch * c * h * w, 2.0), [batch, c, h, w]), &ad);
    let sigma = Tensor::<1>::from_data(TensorData::new(values(batch, 2.0), [batch]), &ad);
    let class_labels = (labels > 0).then(|| Tensor::<2>::zeros([batch, labels], &ad));
    match step {
        Step::Net => {
            for pass in 0..2 {
                sync(phase(pass, "forward"));
                let y = network.forward(x.clone(), sigma.clone(), class_labels.clone());
                sync(phase(pass, "backward"));
                drop(y.square().mean().backward());
                sync(phase(pass, "end"));
            }
        }
        Step::Teacher => {
            // As `dmd bench` times it: Burn's Adam defaults, the loss on given noise.
            let mut optim = dmd_experiments::optim::adam(0.9, 0.999, 1e-5);
            let noise = Tensor::<4>::from_data(TensorData::new(values(batch * c * h * w, 1.0), [batch, c, h, w]), &ad);
            let mut network = Some(network);
            for pass in 0..2 {
                sync(phase(pass, "forward + backward"));
                let n = network.take().expect("network");
                let loss = dmd_losses::edm::edm_loss(&n, x.clone(), class_labels.clone(), sigma.clone(), noise.clone()).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &n);
                sync(phase(pass, "Adam update"));
                network = Some(optim.step(1e-4, n, grads));
                sync(phase(pass, "end"));
            }
        }
        Step::Dmd => {
            // As `dmd bench` runs it: the network (random weights) as teacher, DMD's defaults.
            let teacher = EdmPrecond::new(&config, &device, 0);
            let (cfg, dir) = bench_distill_config(&teacher, Backend::CubeCpu, batch, 1, false).unwrap_or_else(|e| fail(&format!("{e:#}")));
            let mut distiller = Distiller::new(&cfg, None).unwrap_or_else(|e| fail(&format!("{e:#}")));
            // `Backend::device` sets the convolution from DMD_CONV; --conv wins.
            set_conv_impl(conv);
            for pass in 0..2 {
                sync(phase(pass, "DMD iteration"));
                distiller.step(pass).unwrap_or_else(|e| fail(&format!("{e:#}")));
                sync(phase(pass, "end"));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
