//! Further EDM configurations, generated with the official code by
//! `tests/data/edm_extra/make_cases.py` (see its README): several attention heads, no encoder
//! blocks, grayscale, augmentation labels, NCSN++ (Fourier embedding, residual encoder, skip
//! decoder, [1,3,3,1] filter), skip encoders, and EDM's training loss.

mod common;

use burn::tensor::Tensor;
use common::*;
use dmd_losses::edm::edm_loss;
use dmd_models::{sample, EdmPrecond, HostTensor, NetDenoiser, SamplerConfig, Solver};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/edm_extra")
}

fn check(name: &str) {
    let dir = data_dir();
    let cases = read(&dir.join(format!("{name}_cases.safetensors")));
    let labels = |key: &str| cases.get(key);
    for (backend, device) in cpu_backends() {
        let net = EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), &device, "t")
            .unwrap_or_else(|e| panic!("{e}"));
        let x = get(&cases, "denoise_x").to_tensor::<4>(&device);
        let sigma = get(&cases, "denoise_sigma").to_tensor::<1>(&device);
        let l = labels("denoise_labels").map(|l| l.to_tensor::<2>(&device));
        let out = HostTensor::from_tensor(net.forward(x.clone(), sigma.clone(), l.clone()));
        assert_close(&format!("{name} denoise_out [{backend}]"), &out, get(&cases, "denoise_out"), 1e-5);
        if let Some(aug) = cases.get("denoise_augment_labels") {
            let out = HostTensor::from_tensor(net.forward_augmented(x, sigma, l, Some(aug.to_tensor::<2>(&device))));
            assert_close(&format!("{name} denoise_augment_out [{backend}]"), &out, get(&cases, "denoise_augment_out"), 1e-5);
        }
        let denoiser = NetDenoiser { net: &net, device: device.clone() };
        for (solver, key) in [(Solver::Heun, "sample_out"), (Solver::Euler, "euler_out")] {
            let cfg = SamplerConfig { solver, ..SamplerConfig::default() };
            let got = sample(&denoiser, get(&cases, "sample_latents"), labels("sample_labels"), &cfg, &mut [], |_| {});
            assert_close(&format!("{name} {key} [{backend}]"), &got, get(&cases, key), 1e-5);
        }
    }
}

#[test]
fn adm_unconditional_several_heads() {
    check("adm_uncond_heads");
}

#[test]
fn adm_grayscale_with_augment_labels() {
    check("adm_gray_aug");
}

#[test]
fn ncsnpp_fourier_residual_skip_decoder() {
    check("ncsnpp_tiny");
}

#[test]
fn songunet_skip_encoder() {
    check("songunet_skip_enc");
}

#[test]
fn songunet_skip_encoder_and_decoder() {
    check("songunet_skip_both");
}

#[test]
fn edm_loss_matches_edm() {
    let dir = data_dir();
    let cases = read(&dir.join("edm_loss_cases.safetensors"));
    let reference = get(&cases, "loss");
    let per = reference.data.len() / reference.shape[0];
    let want = HostTensor::new(vec![reference.shape[0]], reference.data.chunks(per).map(|c| c.iter().map(|&v| v as f64).sum::<f64>() as f32).collect());
    for (backend, device) in cpu_backends() {
        let net = EdmPrecond::load(&dir.join("adm_uncond_heads.safetensors"), &dir.join("adm_uncond_heads.json"), &device, "t").unwrap();
        let loss: Tensor<1> = edm_loss(
            &net,
            get(&cases, "y").to_tensor(&device),
            None,
            get(&cases, "sigma").to_tensor(&device),
            get(&cases, "noise").to_tensor(&device),
        );
        assert_close(&format!("EDM loss per sample [{backend}]"), &HostTensor::from_tensor(loss), &want, 1e-5);
    }
}
