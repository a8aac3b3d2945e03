//! EDM networks and sampler against the official implementation (`../shared/reference/edm`):
//! the denoiser outputs and 18-step Heun samples of `adm_tiny` (DhariwalUNet) and
//! `ddpmpp_tiny` (SongUNet, DDPM++), loaded through the real import path, on both CPU backends
//! and with both ways of computing the convolutions (Burn's `conv2d` and our im2col product,
//! the default on CUDA).

mod common;

use common::*;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
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
    for (backend, device, conv) in runs.chain(im2col) {
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
    set_conv_impl(ConvImpl::Native);
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
