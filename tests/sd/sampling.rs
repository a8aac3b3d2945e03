//! Stable Diffusion's schedule and samplers against diffusers (`../shared/reference/sd/`):
//! `alphas_cumprod`, the PNDM (PLMS) and DDIM timesteps, and the whole 50-step PNDM and
//! 20-step DDIM trajectories with classifier-free guidance 3 on the tiny random UNet.


use burn::tensor::Tensor;
use crate::common::{assert_close, cpu_backends, get, read, reference_dir};
use dmd_models::sd::pipeline::guided_eps;
use dmd_models::sd::scheduler::{sample, Scheduler, SchedulerConfig, SchedulerKind};
use dmd_models::sd::unet::UNet2DCondition;
use dmd_models::HostTensor;
use std::path::Path;

/// An int64 or float64 tensor of the cases file, as f64.
fn raw(path: &Path, key: &str) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap_or_else(|_| panic!("reference tensor `{key}` missing"));
    match t.dtype() {
        safetensors::Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        safetensors::Dtype::F64 => t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        d => panic!("{key}: unexpected dtype {d:?}"),
    }
}

#[test]
fn schedule_and_timesteps_match_diffusers() {
    let Some(dir) = reference_dir("sd") else { return };
    let cases = dir.join("sd_cases.safetensors");
    let cfg = SchedulerConfig::default();
    let want = raw(&cases, "alphas_cumprod");
    let got = cfg.alphas_cumprod();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(g, w)| (g / w - 1.0).abs()).fold(0.0, f64::max);
    eprintln!("alphas_cumprod: max relative error {worst:.2e}");
    assert!(worst < 1e-5, "alphas_cumprod: max relative error {worst:.2e}");
    let steps = |kind, n| Scheduler::new(&cfg, kind, n).unwrap().timesteps().iter().map(|&t| t as f64).collect::<Vec<_>>();
    assert_eq!(steps(SchedulerKind::Pndm, 50), raw(&cases, "pndm_timesteps"));
    assert_eq!(steps(SchedulerKind::Ddim, 20), raw(&cases, "ddim_timesteps"));
}

#[test]
fn guided_pndm_and_ddim_trajectories_match_diffusers() {
    let Some(dir) = reference_dir("sd") else { return };
    let cases = read(&dir.join("sd_cases.safetensors"));
    let cfg = SchedulerConfig::default();
    // The 71 guided UNet calls on flex; the UNet itself is checked on every backend in sd_unet.
    for (name, device) in cpu_backends().into_iter().take(1) {
        let unet = UNet2DCondition::load(&dir.join("unet"), &device).unwrap_or_else(|e| panic!("{e}"));
        let cond: Tensor<3> = get(&cases, "text_embeddings").to_tensor(&device);
        let uncond: Tensor<3> = get(&cases, "uncond_embeddings").to_tensor(&device);
        let init: Tensor<4> = get(&cases, "sample_init_latents").to_tensor(&device);
        for (kind, steps, key) in [(SchedulerKind::Pndm, 50, "pndm_out"), (SchedulerKind::Ddim, 20, "ddim_out")] {
            let eps = |x: Tensor<4>, t: usize| {
                let n = x.dims()[0];
                guided_eps(&unet, x, Tensor::full([n], t as f64, &device), cond.clone(), uncond.clone(), 3.0)
            };
            let out = sample(&cfg, kind, steps, init.clone(), eps, |_, _| {}).unwrap();
            assert_close(&format!("{name}: {key}"), &HostTensor::from_tensor(out), get(&cases, key), 1e-5);
        }
    }
}

#[test]
fn scheduler_configs_are_checked() {
    let Some(_) = reference_dir("sd") else { return };
    let dir = crate::common::scratch("sd_scheduler_config");
    let write = |text: &str| {
        let p = dir.join("scheduler_config.json");
        std::fs::write(&p, text).unwrap();
        SchedulerConfig::from_json_file(&p).map(|_| ()).map_err(|e| e.to_string())
    };
    // SD v1.5's own file (with its extra keys) is accepted.
    write(r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false}"#)
        .unwrap();
    let err = write(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap_err();
    assert!(err.contains("scheduler_config.json") && err.contains("beta_schedule"), "{err}");
    let err = write(r#"{"prediction_type": "v_prediction"}"#).unwrap_err();
    assert!(err.contains("prediction_type"), "{err}");
    assert!(Scheduler::new(&SchedulerConfig::default(), SchedulerKind::Pndm, 0).is_err());
}
