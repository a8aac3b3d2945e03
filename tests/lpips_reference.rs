//! LPIPS-VGG v0.1 against the `lpips` package (`../shared/reference/eval/lpips_cases.safetensors`,
//! random VGG16 weights and the real heads): the distance per pair and its gradient.

mod common;

use burn::tensor::Tensor;
use common::*;
use dmd_models::lpips::{Lpips, SCALING_SCALE, SCALING_SHIFT};
use dmd_models::HostTensor;

#[test]
fn lpips_matches_the_lpips_package() {
    let Some(dir) = reference_dir("eval") else { return };
    let cases = read(&dir.join("lpips_cases.safetensors"));
    assert_eq!(get(&cases, "scaling_shift").data, SCALING_SHIFT.to_vec(), "ScalingLayer shift");
    assert_eq!(get(&cases, "scaling_scale").data, SCALING_SCALE.to_vec(), "ScalingLayer scale");
    let (vgg, heads) = (dir.join("vgg16_features_random.safetensors"), dir.join("lpips_vgg_v0.1_lin.safetensors"));
    for (backend, device) in cpu_backends() {
        // The gradient through VGG16 runs on flex only: ndarray's convolution backward takes
        // minutes at this size (measured 7 min on 2 cores). ndarray checks the distance of the
        // first two pairs (its forward alone takes ~20 s per two pairs).
        let with_grad = backend == "flex";
        let dev = if with_grad { device.clone().autodiff() } else { device.clone() };
        let net = Lpips::load(&vgg, &heads, &dev).unwrap_or_else(|e| panic!("{e}"));
        let pairs = if with_grad { 4 } else { 2 };
        let img0 = get(&cases, "img0").to_tensor::<4>(&dev).narrow(0, 0, pairs);
        let img0 = if with_grad { img0.require_grad() } else { img0 };
        let d = net.distance(img0.clone(), get(&cases, "img1").to_tensor::<4>(&dev).narrow(0, 0, pairs));
        let host = |t: Tensor<1>| HostTensor::from_tensor(if with_grad { t.inner() } else { t });
        let want = get(&cases, "lpips");
        let want = HostTensor::new(vec![pairs], want.data[..pairs].to_vec());
        assert_close(&format!("lpips [{backend}]"), &host(d.clone()), &want, 1e-5);
        if !with_grad {
            continue;
        }
        let g: Tensor<4> = img0.grad(&d.sum().backward()).expect("gradient with respect to img0");
        let (g, want) = (HostTensor::from_tensor(g), get(&cases, "grad_img0_of_sum"));
        // Per pair. The gradient passes through ReLUs and max-pools, where a near-tie flips with
        // float32 rounding: for pair 0, PyTorch's own float32 run on this machine lies 1.2e-2 from
        // the reference, its float64 run 2.1e-6 (measured 2026-11-25 with lpips 0.1.4); we land on
        // the float32 side (7.5e-6 from that float32 run). So: three of the four pairs within
        // 1e-4, and none further than such a flip (2e-2). A wrong formula misses every pair.
        let per = want.data.len() / 4;
        let errs: Vec<f64> = (0..4).map(|i| rel_l2(&g.data[i * per..(i + 1) * per], &want.data[i * per..(i + 1) * per])).collect();
        let shown = errs.iter().map(|e| format!("{e:.2e}")).collect::<Vec<_>>().join(", ");
        eprintln!("d sum(lpips) / d img0 per pair [{backend}]: {shown}");
        assert!(errs.iter().filter(|&&e| e <= 1e-4).count() >= 3, "gradient: fewer than three pairs within 1e-4: {shown}");
        assert!(errs.iter().all(|&e| e <= 2e-2), "gradient: a pair beyond 2e-2: {shown}");
    }
}

/// DMD upsamples images smaller than 224 before LPIPS, as PyTorch's bilinear `interpolate`
/// with `align_corners=False` does (`tests/data/resize`, made with PyTorch).
#[test]
fn bilinear_upsampling_matches_pytorch() {
    let cases = read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/resize/resize_cases.safetensors"));
    for (backend, device) in cpu_backends() {
        for (input, output, size) in [("small", "small_224", [224, 224]), ("odd", "odd_20x31", [20, 31])] {
            let y = dmd_models::lpips::upsample_bilinear(get(&cases, input).to_tensor(&device), size);
            assert_close(&format!("{output} [{backend}]"), &HostTensor::from_tensor(y), get(&cases, output), 1e-5);
        }
    }
}
