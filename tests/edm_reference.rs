//! EDM networks and sampler against the official implementation (`../shared/reference/edm`):
//! the denoiser outputs and 18-step Heun samples of `adm_tiny` (DhariwalUNet) and
//! `ddpmpp_tiny` (SongUNet, DDPM++), loaded through the real import path, on both CPU backends
//! and with each way of computing the convolutions (Burn's `conv2d`, our im2col product, and
//! `gemm_conv2d`, the default: on flex this project's own kernels, `cpu_conv`, on ndarray
//! Burn's). On flex SiLU, group norm, attention, resampling, the convolution bias and the
//! skip concatenation are this project's kernels too.
//! Also: flex's training step gives the same bits run to run.

mod common;

use common::*;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use dmd_models::gemm_conv::gemm_conv2d;
use dmd_models::nn::{conv2d_im2col, set_conv_impl, ConvImpl};
use dmd_models::{edm_time_steps, sample, EdmPrecond, HostTensor, NetDenoiser, SamplerConfig};
use std::path::Path;
use std::sync::Mutex;

/// The convolution choice is process-wide: the tests that change it take turns.
static CONV_IMPL: Mutex<()> = Mutex::new(());

fn check_case(dir: &Path, name: &str) {
    let cases = read(&dir.join(format!("{name}_cases.safetensors")));
    // The schedule itself (float64 in the file, read as float32).
    let t_ref = get(&cases, "sample_t_steps");
    let t = edm_time_steps(18, 0.002, 80.0, 7.0);
    let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    assert!(rel_l2(&t32, &t_ref.data) < 1e-7, "{name}: time steps differ");

    let _turn = CONV_IMPL.lock().unwrap_or_else(|e| e.into_inner());
    let runs = cpu_backends().into_iter().map(|(b, d)| (b.to_string(), d, ConvImpl::Native));
    let im2col = cpu_backends().into_iter().map(|(b, d)| (format!("{b}, im2col"), d, ConvImpl::Im2col));
    let gemm = cpu_backends().into_iter().map(|(b, d)| (format!("{b}, gemm_conv2d"), d, ConvImpl::Gemm));
    for (backend, device, conv) in runs.chain(im2col).chain(gemm) {
        set_conv_impl(conv);
        let net = EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), &device, "teacher")
            .unwrap_or_else(|e| panic!("{e}"));
        let x = get(&cases, "denoise_x").to_tensor::<4>(&device);
        let sigma = get(&cases, "denoise_sigma").to_tensor::<1>(&device);
        let labels = get(&cases, "denoise_labels").to_tensor::<2>(&device);
        let out = HostTensor::from_tensor(net.forward(x, sigma, Some(labels)));
        assert_close(&format!("{name} denoise_out [{backend}]"), &out, get(&cases, "denoise_out"), 1e-5);

        let denoiser = NetDenoiser { net: &net, device: device.clone() };
        let samples = sample(&denoiser, get(&cases, "sample_latents"), Some(get(&cases, "sample_labels")), &SamplerConfig::default(), &mut [], |_| {});
        assert_close(&format!("{name} sample_out [{backend}]"), &samples, get(&cases, "sample_out"), 1e-5);
    }
    set_conv_impl(ConvImpl::Gemm);
}

#[test]
fn adm_tiny_matches_edm() {
    let Some(dir) = reference_dir("edm") else { return };
    check_case(&dir, "adm_tiny");
}

#[test]
fn ddpmpp_tiny_matches_edm() {
    let Some(dir) = reference_dir("edm") else { return };
    check_case(&dir, "ddpmpp_tiny");
}

/// `gemm_conv2d` (the CUDA implicit-GEMM convolution's own autodiff operation; on the CPU
/// backends its three kernels are Burn's `conv2d` and its two backward ops) gives Burn's
/// `conv2d` output and gradients: the backward wiring (which saved tensor goes to which
/// kernel, which parent gets which gradient, an untracked input, a gradient flowing on to
/// the operation before it).
/// The flex kernels' sums run in a fixed order whatever the thread scheduling (the weight
/// gradient's partial sums included): two identical training steps give identical bits.
#[test]
fn flex_training_step_is_deterministic() {
    let _turn = CONV_IMPL.lock().unwrap_or_else(|e| e.into_inner());
    set_conv_impl(ConvImpl::Gemm);
    let cfg = dmd_models::EdmConfig::from_json_str(include_str!("../experiments/configs/networks/adm_tiny.json")).unwrap();
    let ad = burn::tensor::Device::flex().autodiff();
    let net = EdmPrecond::new(&cfg, &ad, 3);
    let mut rng = StdRng::seed_from_u64(11);
    let mut normal = |shape: Vec<usize>| HostTensor::new(shape.clone(), (0..shape.iter().product()).map(|_| rng.sample::<f32, _>(StandardNormal)).collect());
    let (x, noise) = (normal(vec![16, 3, 16, 16]), normal(vec![16, 3, 16, 16]));
    let labels = HostTensor::new(vec![16, 10], (0..160).map(|i| (i % 10 == i / 10 % 10) as u8 as f32).collect());
    let step = || {
        let sigma: Tensor<1> = Tensor::from_data(burn::tensor::TensorData::new((0..16).map(|i| 0.05 + 0.5 * i as f32).collect::<Vec<_>>(), [16]), &ad);
        let x: Tensor<4> = x.to_tensor(&ad);
        let noisy = x.clone() + noise.to_tensor::<4>(&ad) * sigma.clone().reshape([16, 1, 1, 1]);
        let loss = (net.forward(noisy, sigma, Some(labels.to_tensor(&ad))) - x).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: Vec<Vec<f32>>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.grads.get::<D>(param.id) {
                    self.out.push(HostTensor::from_tensor(g.reshape([-1])).data);
                }
            }
        }
        let mut c = Collect { grads: &grads, out: Vec::new() };
        net.visit(&mut c);
        c.out
    };
    let (a, b) = (step(), step());
    assert!(a.len() > 50, "only {} parameter gradients", a.len());
    assert!(a.iter().flatten().any(|v| *v != 0.0), "all gradients zero");
    for (i, (ga, gb)) in a.iter().zip(&b).enumerate() {
        assert!(ga.iter().zip(gb).all(|(x, y)| x.to_bits() == y.to_bits()), "parameter {i}: gradients differ between two identical steps");
    }
}

#[test]
fn gemm_conv_autodiff_matches_burn_conv2d() {
    for (backend, device) in cpu_backends() {
        let ad = device.clone().autodiff();
        let mut rng = StdRng::seed_from_u64(7);
        // (out channels, kernel, stride, padding, track the input, track the weight)
        let cases = [
            (4, [3, 3], 1, [1, 1], true, true),
            (3, [3, 3], 1, [0, 0], true, true),
            (4, [1, 7], 1, [0, 3], true, true),
            (4, [3, 3], 2, [1, 1], true, true),
            (4, [3, 3], 1, [1, 1], false, true),
            (4, [3, 3], 1, [1, 1], true, false),
        ];
        for (o, [kh, kw], stride, [ph, pw], track_x, track_w) in cases {
            let mut normal = |shape: Vec<usize>| {
                let data = (0..shape.iter().product()).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
                HostTensor::new(shape, data)
            };
            let x0: Tensor<4> = normal(vec![2, 5, 7, 6]).to_tensor(&ad);
            let w0: Tensor<4> = normal(vec![o, 5, kh, kw]).to_tensor(&ad);
            let r: Tensor<4> = normal(vec![2, o, (7 + 2 * ph - kh) / stride + 1, (6 + 2 * pw - kw) / stride + 1]).to_tensor(&ad);
            let run = |gemm: bool| {
                let x0 = x0.clone().detach().require_grad();
                let w = if track_w { w0.clone().detach().require_grad() } else { w0.clone().detach() };
                // An operation before the convolution: its input's gradient passes through.
                let x = if track_x { x0.clone().mul_scalar(1.5) } else { x0.clone().detach() };
                let y = if gemm { gemm_conv2d(x, w.clone(), stride, [ph, pw]) } else { conv2d(x, w.clone(), None, ConvOptions::new([stride, stride], [ph, pw], [1, 1], 1)) };
                let grads = (y.clone() * r.clone()).sum().backward();
                let gx = x0.grad(&grads).map(|g| HostTensor::from_tensor(g.reshape([-1]).inner()).data);
                let gw = w.grad(&grads).map(|g| HostTensor::from_tensor(g.reshape([-1]).inner()).data);
                (HostTensor::from_tensor(y.reshape([-1]).inner()).data, gx, gw)
            };
            let (want, got) = (run(false), run(true));
            let case = format!("[{backend}] {o} out, {kh}x{kw} stride {stride} pad {ph}x{pw}, input tracked {track_x}, weight tracked {track_w}");
            assert!(rel_l2(&got.0, &want.0) < 1e-6, "{case}: output differs");
            assert_eq!(got.1.is_some(), track_x, "{case}: input gradient present = {}", got.1.is_some());
            assert_eq!(got.2.is_some(), track_w, "{case}: weight gradient present = {}", got.2.is_some());
            for (what, g, w) in [("input gradient", &got.1, &want.1), ("weight gradient", &got.2, &want.2)] {
                if let (Some(g), Some(w)) = (g, w) {
                    let err = rel_l2(g, w);
                    assert!(err < 1e-6, "{case}: {what} relative L2 error {err:.2e}");
                }
            }
        }
    }
}

/// Flex's convolution with its bias inside (`cpu_conv::conv2d_bias`, what the networks' biased
/// convolutions run on flex in float32) gives Burn flex's own `conv2d` output and gradients
/// (input, weight, bias), each parent tracked or not: the backward wiring of the three
/// gradients, and the bias gradient summed inside the weight gradient's kernel.
#[test]
fn flex_conv_with_bias_matches_burn_conv2d() {
    let ad = burn::tensor::Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(8);
    // (out channels, kernel, stride, padding, track the input, the weight, the bias)
    let cases = [
        (4, [3, 3], 1, [1, 1], [true, true, true]),
        (6, [1, 1], 1, [0, 0], [true, true, true]),
        (4, [4, 4], 2, [1, 1], [true, true, true]),
        (3, [3, 3], 1, [1, 1], [false, true, true]),
        (3, [3, 3], 1, [1, 1], [true, false, true]),
        (3, [3, 3], 1, [1, 1], [true, true, false]),
        (3, [3, 3], 1, [1, 1], [true, false, false]),
    ];
    for (o, [kh, kw], stride, [ph, pw], track) in cases {
        let mut normal = |shape: Vec<usize>| {
            let data = (0..shape.iter().product()).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
            HostTensor::new(shape, data)
        };
        let (ho, wo) = ((8 + 2 * ph - kh) / stride + 1, (6 + 2 * pw - kw) / stride + 1);
        let x0: Tensor<4> = normal(vec![3, 5, 8, 6]).to_tensor(&ad);
        let w0: Tensor<4> = normal(vec![o, 5, kh, kw]).to_tensor(&ad);
        let b0: Tensor<1> = normal(vec![o]).to_tensor(&ad);
        // Positive weights on the output: no cancellation in the bias gradient's sum.
        let r: Tensor<4> = normal(vec![3, o, ho, wo]).to_tensor(&ad).abs().add_scalar(0.5);
        let run = |ours: bool| {
            let leaf = |t: Tensor<4>, tracked: bool| if tracked { t.detach().require_grad() } else { t.detach() };
            let x0 = x0.clone().detach().require_grad();
            let w = leaf(w0.clone(), track[1]);
            let b = if track[2] { b0.clone().detach().require_grad() } else { b0.clone().detach() };
            // An operation before the convolution: its input's gradient passes through.
            let x = if track[0] { x0.clone().mul_scalar(1.5) } else { x0.clone().detach() };
            let y = if ours {
                dmd_models::cpu_conv::conv2d_bias(x, w.clone(), b.clone(), stride, [ph, pw])
            } else {
                conv2d(x, w.clone(), Some(b.clone()), ConvOptions::new([stride, stride], [ph, pw], [1, 1], 1))
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            let gx = x0.grad(&grads).map(|g| HostTensor::from_tensor(g.reshape([-1]).inner()).data);
            let gw = w.grad(&grads).map(|g| HostTensor::from_tensor(g.reshape([-1]).inner()).data);
            let gb = b.grad(&grads).map(|g| HostTensor::from_tensor(g.reshape([-1]).inner()).data);
            (HostTensor::from_tensor(y.reshape([-1]).inner()).data, [gx, gw, gb])
        };
        let (want, got) = (run(false), run(true));
        let case = format!("{o} out, {kh}x{kw} stride {stride} pad {ph}x{pw}, tracked (input, weight, bias) {track:?}");
        assert!(rel_l2(&got.0, &want.0) < 1e-6, "{case}: output differs");
        for (i, what) in ["input", "weight", "bias"].into_iter().enumerate() {
            assert_eq!(got.1[i].is_some(), track[i], "{case}: {what} gradient present = {}", got.1[i].is_some());
            if let (Some(g), Some(w)) = (&got.1[i], &want.1[i]) {
                let err = rel_l2(g, w);
                assert!(err < 1e-6, "{case}: {what} gradient relative L2 error {err:.2e}");
            }
        }
    }
}

/// The im2col convolution's output and gradients (input, weight, bias) agree with Burn's
/// `conv2d` for the kernel shapes the networks use (EDM's 3x3 and 1x1, Inception's 1x7 and
/// 7x1, a 1x1 to one channel on one image as in the GAN head), with and without padding.
#[test]
fn im2col_conv_matches_burn_conv2d() {
    for (backend, device) in cpu_backends() {
        let ad = device.clone().autodiff();
        let mut rng = StdRng::seed_from_u64(6);
        // (images, out channels, kernel, padding)
        let cases = [(2, 4, [3, 3], [1, 1]), (2, 4, [1, 1], [0, 0]), (2, 4, [3, 3], [0, 0]), (2, 4, [2, 2], [1, 1]), (2, 4, [1, 7], [0, 3]), (2, 4, [7, 1], [3, 0]), (1, 1, [1, 1], [0, 0])];
        for (n, o, [kh, kw], [ph, pw]) in cases {
            // Seeded inputs: the same case on every run and every machine.
            let mut normal = |shape: Vec<usize>| {
                let data = (0..shape.iter().product()).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
                HostTensor::new(shape, data)
            };
            let x: Tensor<4> = normal(vec![n, 5, 7, 6]).to_tensor(&ad);
            let w: Tensor<4> = normal(vec![o, 5, kh, kw]).to_tensor(&ad);
            let b: Tensor<1> = normal(vec![o]).to_tensor(&ad);
            // An output weighting, so that the gradients are not all ones; positive, so that
            // the bias gradient (its sum over images and pixels) has no cancellation to make
            // float32 rounding look like a disagreement.
            let ho = 7 + 2 * ph + 1 - kh;
            let wo = 6 + 2 * pw + 1 - kw;
            let r: Tensor<4> = normal(vec![n, o, ho, wo]).to_tensor(&ad).abs().add_scalar(0.5);
            let run = |im2col: bool| {
                let (x, w, b) = (x.clone().detach().require_grad(), w.clone().detach().require_grad(), b.clone().detach().require_grad());
                let y = if im2col {
                    conv2d_im2col(x.clone(), w.clone(), Some(b.clone()), [ph, pw])
                } else {
                    conv2d(x.clone(), w.clone(), Some(b.clone()), ConvOptions::new([1, 1], [ph, pw], [1, 1], 1))
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                [y, x.grad(&grads).unwrap(), w.grad(&grads).unwrap().reshape([-1, 1, 1, 1]), b.grad(&grads).unwrap().reshape([-1, 1, 1, 1])]
                    .map(|t| HostTensor::from_tensor(t.reshape([-1]).inner()).data)
            };
            let (want, got) = (run(false), run(true));
            for (what, (g, w)) in ["output", "input gradient", "weight gradient", "bias gradient"].iter().zip(got.iter().zip(&want)) {
                // The two add in different orders: float32 rounding, at most 4.8e-7 over 300
                // seeds on either backend; a wrong index would give errors of order one.
                let err = rel_l2(g, w);
                assert!(err < 5e-6, "[{backend}] {n}x{o} {kh}x{kw} pad {ph}x{pw}: {what} relative L2 error {err:.2e}");
            }
        }
    }
}
