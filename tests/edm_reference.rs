//! EDM networks and sampler against the official implementation (`../shared/reference/edm`):
//! the denoiser outputs and 18-step Heun samples of `adm_tiny` (DhariwalUNet) and
//! `ddpmpp_tiny` (SongUNet, DDPM++), loaded through the real import path, on both CPU backends.

mod common;

use common::*;
use dmd_models::{edm_time_steps, sample, EdmPrecond, HostTensor, NetDenoiser, SamplerConfig};
use std::path::Path;

fn check_case(dir: &Path, name: &str) {
    let cases = read(&dir.join(format!("{name}_cases.safetensors")));
    // The schedule itself (float64 in the file, read as float32).
    let t_ref = get(&cases, "sample_t_steps");
    let t = edm_time_steps(18, 0.002, 80.0, 7.0);
    let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    assert!(rel_l2(&t32, &t_ref.data) < 1e-7, "{name}: time steps differ");

    for (backend, device) in cpu_backends() {
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
