//! Stable Diffusion's `AutoencoderKL` against diffusers (`../shared/reference/sd/`: a tiny
//! random VAE with SD v1.5's structure, channels (32, 64)): the encoder posterior and the
//! decoder output, the gradient through the decoder, and the errors for a damaged weights file.


use burn::tensor::Tensor;
use crate::common::*;
use dmd_models::sd::vae::{AutoencoderKL, VaeConfig};
use dmd_models::HostTensor;
use std::path::Path;

#[test]
fn vae_matches_diffusers() {
    let Some(dir) = reference_dir("sd") else { return };
    let cases = read(&dir.join("sd_cases.safetensors"));
    for (backend, device) in cpu_backends() {
        let vae = AutoencoderKL::load(&dir.join("vae"), &device).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((vae.latent_channels(), vae.downscale()), (4, 2));
        assert_eq!(vae.scaling_factor(), 0.18215);
        let (mean, logvar) = vae.encode(get(&cases, "vae_encode_image").to_tensor(&device));
        assert_close(&format!("encode mean [{backend}]"), &HostTensor::from_tensor(mean), get(&cases, "vae_encode_mean"), 1e-5);
        assert_close(&format!("encode logvar [{backend}]"), &HostTensor::from_tensor(logvar), get(&cases, "vae_encode_logvar"), 1e-5);
        let image = vae.decode(get(&cases, "vae_decode_latents").to_tensor(&device));
        assert_close(&format!("decode [{backend}]"), &HostTensor::from_tensor(image), get(&cases, "vae_decode_image"), 1e-5);
    }
}

/// The decoder sits inside a training loss: gradients must reach the latents, while the
/// loaded (frozen) VAE's own parameters get none. Checked against a central finite difference
/// of the same sum along a random direction.
#[test]
fn gradient_flows_through_the_decoder() {
    let Some(dir) = reference_dir("sd") else { return };
    let cases = read(&dir.join("sd_cases.safetensors"));
    let plain = burn::tensor::Device::flex();
    let ad = plain.clone().autodiff();
    let vae = AutoencoderKL::load(&dir.join("vae"), &ad).unwrap_or_else(|e| panic!("{e}"));
    let z_host = get(&cases, "vae_decode_latents");
    let weights_host = HostTensor::new(vec![2, 3, 32, 32], (0..2 * 3 * 32 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect());
    let z = z_host.to_tensor::<4>(&ad).require_grad();
    let loss = (vae.decode(z.clone()) * weights_host.to_tensor::<4>(&ad)).sum();
    let grads = loss.backward();
    let g = HostTensor::from_tensor(z.grad(&grads).expect("gradient with respect to the latents"));
    assert!(g.data.iter().all(|v| v.is_finite()) && g.data.iter().any(|v| *v != 0.0), "gradient must be finite and non-zero");
    assert!(vae.decoder.conv_out.weight.grad(&grads).is_none(), "a loaded VAE is frozen");

    // Directional derivative by central differences (float32: step 1e-2 on latents of unit scale).
    let dir_v: Vec<f32> = (0..z_host.data.len()).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let eps = 1e-2f32;
    let plain_vae = AutoencoderKL::load(&dir.join("vae"), &plain).unwrap();
    let f = |sign: f32| -> f64 {
        let z: Vec<f32> = z_host.data.iter().zip(&dir_v).map(|(a, d)| a + sign * eps * d).collect();
        let out = plain_vae.decode(HostTensor::new(z_host.shape.clone(), z).to_tensor(&plain));
        let y: Tensor<1> = (out * weights_host.to_tensor::<4>(&plain)).sum();
        y.into_scalar::<f64>()
    };
    let numeric = (f(1.0) - f(-1.0)) / (2.0 * eps as f64);
    let analytic: f64 = g.data.iter().zip(&dir_v).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rel = (numeric - analytic).abs() / analytic.abs().max(1e-6);
    eprintln!("directional derivative: analytic {analytic:.6e}, numeric {numeric:.6e}, relative difference {rel:.2e}");
    assert!(rel < 1e-2, "gradient disagrees with finite differences: {analytic} vs {numeric}");
}

/// Copies the reference `vae/` folder with its weights changed by `edit`.
fn damaged_copy(src: &Path, name: &str, edit: impl FnOnce(&mut dmd_models::NamedTensors)) -> std::path::PathBuf {
    let dir = scratch(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = read(&src.join(AutoencoderKL::WEIGHTS_FILE));
    edit(&mut t);
    t.write(&dir.join(AutoencoderKL::WEIGHTS_FILE)).unwrap();
    dir
}

#[test]
fn missing_or_misshaped_tensor_is_named() {
    let Some(dir) = reference_dir("sd") else { return };
    let src = dir.join("vae");
    let device = burn::tensor::Device::flex();

    let key = "decoder.up_blocks.0.upsamplers.0.conv.weight";
    let missing = damaged_copy(&src, "sd_vae_missing", |t| {
        t.tensors.remove(key);
    });
    let err = AutoencoderKL::load(&missing, &device).expect_err("a missing tensor must fail").to_string();
    eprintln!("{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains(AutoencoderKL::WEIGHTS_FILE) && err.contains(key) && err.contains("missing"), "{err}");

    let key = "encoder.mid_block.attentions.0.to_q.weight";
    let misshaped = damaged_copy(&src, "sd_vae_shape", |t| {
        t.insert(key, HostTensor::new(vec![64, 32], vec![0.0; 64 * 32]));
    });
    let err = AutoencoderKL::load(&misshaped, &device).expect_err("a mis-shaped tensor must fail").to_string();
    eprintln!("{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains(AutoencoderKL::WEIGHTS_FILE) && err.contains(key) && err.contains("[64, 32]"), "{err}");
}

#[test]
fn unsupported_config_is_refused_by_key() {
    let Some(dir) = reference_dir("sd") else { return };
    let text = std::fs::read_to_string(dir.join("vae/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    let tmp = scratch("sd_vae_config");
    std::fs::write(tmp.join("config.json"), json.to_string()).unwrap();
    std::fs::copy(dir.join("vae").join(AutoencoderKL::WEIGHTS_FILE), tmp.join(AutoencoderKL::WEIGHTS_FILE)).unwrap();
    let err = AutoencoderKL::load(&tmp, &burn::tensor::Device::flex()).expect_err("unsupported block type").to_string();
    eprintln!("{err}");
    assert!(!err.contains('\n') && err.contains("config.json") && err.contains("up_block_types") && err.contains("AttnUpDecoderBlock2D"), "{err}");

    // Defaults are diffusers' and unknown keys are ignored.
    let cfg = VaeConfig::from_json_str(r#"{"_class_name": "AutoencoderKL", "sample_size": 512}"#).unwrap();
    assert_eq!((cfg.block_out_channels.clone(), cfg.latent_channels, cfg.norm_num_groups), (vec![64], 4, 32));
}
