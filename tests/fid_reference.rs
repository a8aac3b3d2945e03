//! FID against its reference implementations (`../shared/reference/eval`): the Inception
//! network's 2048-d pool features (pytorch-fid, random weights under its names; NVIDIA's port
//! with the real weights where given), and the Fréchet distance (pytorch-fid / scipy).

mod common;

use common::*;
use dmd_experiments::fid::{frechet_distance, inception_score, FidStats};
use dmd_models::inception::{FidInception, FidPreprocess};
use dmd_models::HostTensor;

#[test]
fn inception_features_match_pytorch_fid() {
    let Some(dir) = reference_dir("eval") else { return };
    let cases = read(&dir.join("inception_cases.safetensors"));
    // flex only: ndarray needs minutes for these eight 299x299 forwards.
    let device = burn::tensor::Device::flex();
    let net = FidInception::load(&dir.join("inception_fid_random.safetensors"), &device).unwrap_or_else(|e| panic!("{e}"));
    let pixels = get(&cases, "images_u8").to_tensor::<4>(&device);
    let f = HostTensor::from_tensor(net.features_of_pixels(pixels, FidPreprocess::PytorchFid));
    // The README of the case: a correct float32 port agrees to about 1e-4.
    assert_close("pool features (pytorch-fid preprocessing)", &f, get(&cases, "features"), 1e-4);
}

/// The Fréchet distance against pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`) on
/// two statistics files in EDM's layout; and our `.npz` writer round-trips them.
#[test]
fn frechet_distance_matches_pytorch_fid() {
    let Some(dir) = reference_dir("eval") else { return };
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("frechet.json")).unwrap()).unwrap();
    let want = want.as_object().unwrap().values().find_map(|v| v.as_f64()).expect("a number in frechet.json");
    let a = FidStats::read_npz(&dir.join("frechet_a.npz")).unwrap();
    let b = FidStats::read_npz(&dir.join("frechet_b.npz")).unwrap();
    let got = frechet_distance(&a, &b).unwrap();
    eprintln!("Frechet distance {got} (pytorch-fid {want})");
    assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
    // Symmetric, and zero against itself (to rounding).
    assert!(((frechet_distance(&b, &a).unwrap() - want) / want).abs() < 1e-6);
    assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-6 * want);
    let tmp = scratch("fid_npz");
    a.write_npz(&tmp.join("a.npz")).unwrap();
    let back = FidStats::read_npz(&tmp.join("a.npz")).unwrap();
    assert_eq!((back.mu, back.sigma), (a.mu, a.sigma));
}

/// NVIDIA's port (EDM's `fid.py`) with its own preprocessing (TF1 bilinear resize, (x-128)/128)
/// on Fashion-MNIST and 64x64 RGB images. Needs the real weights, which only a user can fetch
/// (`tools/README.md`): set DMD_INCEPTION_WEIGHTS to the converted `default_1.pt`.
#[test]
fn nvidia_inception_matches_edm() {
    let Some(dir) = reference_dir("eval") else { return };
    let Some(weights) = std::env::var_os("DMD_INCEPTION_WEIGHTS") else {
        eprintln!("SKIPPED: set DMD_INCEPTION_WEIGHTS to the converted NVIDIA Inception (see tools/README.md)");
        return;
    };
    let cases = read(&dir.join("nvidia_inception_cases.safetensors"));
    let device = burn::tensor::Device::flex();
    let net = FidInception::load(std::path::Path::new(&weights), &device).unwrap_or_else(|e| panic!("{e}"));
    for (images, features) in [("fashion_u8", "fashion_features"), ("rgb64_u8", "rgb64_features")] {
        let pixels = get(&cases, images).to_tensor::<4>(&device);
        let f = HostTensor::from_tensor(net.features_of_pixels(pixels, FidPreprocess::Nvidia));
        assert_close(&format!("{features} (nvidia preprocessing)"), &f, get(&cases, features), 1e-4);
    }
}

/// The Inception Score against torch-fidelity (`tests/data/inception_score`): the score of
/// given logits (10 splits and 1), and the logits themselves (pool features times the
/// classifier weight, no bias) of pytorch-fid's network for the eight reference images.
#[test]
fn inception_score_matches_torch_fidelity() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/inception_score/is_cases.safetensors");
    let cases = read(&here);
    let logits = get(&cases, "logits");
    let (m10, s10) = inception_score(&logits.data, 1008, 10).unwrap();
    let (m1, _) = inception_score(&logits.data, 1008, 1).unwrap();
    let want = |k: &str| get(&cases, k).data[0] as f64;
    eprintln!("IS {m10} +- {s10} (10 splits), {m1} (1 split); torch-fidelity {} +- {}, {}", want("is_mean_10"), want("is_std_10"), want("is_mean_1"));
    for (got, key) in [(m10, "is_mean_10"), (s10, "is_std_10"), (m1, "is_mean_1")] {
        assert!((got - want(key)).abs() <= 1e-5 * want(key).abs().max(1.0), "{key}: {got} vs {}", want(key));
    }
    let Some(dir) = reference_dir("eval") else { return };
    let device = burn::tensor::Device::flex();
    let w = dir.join("inception_fid_random.safetensors");
    let net = FidInception::load(&w, &device).unwrap();
    let f = net.features_of_pixels(get(&read(&dir.join("inception_cases.safetensors")), "images_u8").to_tensor(&device), FidPreprocess::PytorchFid);
    let fc = get(&read(&w), "fc.weight").to_tensor::<2>(&device);
    let l = HostTensor::from_tensor(f.matmul(fc.transpose()));
    assert_close("logits_unbiased of 8 images", &l, get(&cases, "logits_unbiased_8"), 1e-4);
}
