//! DMD on Stable Diffusion latents with the tiny random SD of `../shared/reference/sd/`:
//! the distribution-matching gradient against DMD2's own formula (x_0 from epsilon at
//! diffusers' `add_noise` latents, guided real score), and `dmd distill` + `dmd txt2img`
//! end to end, with a resumed run repeating the uninterrupted one bit for bit.


use burn::tensor::{Device, Tensor};
use crate::common::*;
use dmd_experiments::sd_distill::{sd_distribution_matching_loss, RealScoreSd};
use dmd_losses::dmd::DmWeighting;
use dmd_models::sd::scheduler::SchedulerConfig;
use dmd_models::sd::unet::UNet2DCondition;
use dmd_models::weights::map_params_flat;
use dmd_models::HostTensor;
use std::path::Path;
use std::process::{Command, Output};

fn dmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn dm_gradient_is_dmd2s_on_latents() {
    let Some(dir) = reference_dir("sd") else { return };
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let cases = read(&dir.join("sd_cases.safetensors"));
    let real = UNet2DCondition::load(&dir.join("unet"), &device).unwrap();
    // A fake score that differs from the teacher: its weights scaled by 0.9.
    let fake = map_params_flat(UNet2DCondition::load_in_namespace(&dir.join("unet"), &device, "fake").unwrap(), |_, w| w.mul_scalar(0.9));
    let context: Tensor<3> = get(&cases, "text_embeddings").to_tensor(&device);
    let uncond: Tensor<3> = get(&cases, "uncond_embeddings").to_tensor(&device);
    let x_host = get(&cases, "vae_decode_latents");
    let noise_host = get(&cases, "sample_init_latents");
    let alphas = SchedulerConfig::default().alphas_cumprod();
    let t = [120usize, 810];
    let guidance = 3.0;

    let dm = sd_distribution_matching_loss(
        x_host.to_tensor(&ad),
        &t,
        noise_host.to_tensor(&ad),
        &alphas,
        DmWeighting::Dmd,
        &RealScoreSd { unet: &real, uncond: uncond.clone(), guidance },
        &fake,
        context.clone(),
    );

    // DMD2 (`sd_guidance.py`): noisy = add_noise(x, noise, t); x0 from each UNet's epsilon;
    // grad = (p_real - p_fake) / mean|p_real| with p = x - x0.
    let x: Tensor<4> = x_host.to_tensor(&device);
    let noise: Tensor<4> = noise_host.to_tensor(&device);
    let per = |f: &dyn Fn(usize) -> f64| Tensor::<1>::from_floats(t.map(|t| f(t) as f32).as_slice(), &device).reshape([2, 1, 1, 1]);
    let (sa, s1a) = (per(&|t| alphas[t].sqrt()), per(&|t| (1.0 - alphas[t]).sqrt()));
    let noisy = x.clone() * sa.clone() + noise * s1a.clone();
    let tt = Tensor::<1>::from_floats([t[0] as f32, t[1] as f32], &device);
    let eps_c = real.forward(noisy.clone(), tt.clone(), context.clone());
    let eps_u = real.forward(noisy.clone(), tt.clone(), uncond.expand([2, 77, 32]));
    let eps_real = eps_u.clone() + (eps_c - eps_u).mul_scalar(guidance);
    let eps_fake = fake.forward(noisy.clone(), tt, context);
    let x0 = |eps: Tensor<4>| (noisy.clone() - eps * s1a.clone()) / sa.clone();
    let p_real = x.clone() - x0(eps_real);
    let p_fake = x - x0(eps_fake);
    let norm = p_real.clone().abs().reshape([2, -1]).mean_dim(1).reshape([2, 1, 1, 1]);
    let want = HostTensor::from_tensor((p_real - p_fake) / norm);
    assert_close("DM gradient vs DMD2's formula", &HostTensor::from_tensor(dm.grad.inner()), &want, 1e-4);
}

#[test]
fn tiny_sd_distils_end_to_end_and_resumes_exactly() {
    let Some(sd) = reference_dir("sd") else { return };
    let tmp = scratch("sd_distill");
    let config = |out: &Path| {
        format!(
            "out_dir = \"{}\"\n[sd]\ndir = \"{}\"\nguidance_scale = 1.75\n\
             [loss]\nregression = \"l2\"\nregression_weight = 0.25\ngan_generator_weight = 1e-3\ngan_discriminator_weight = 1e-2\n\
             [pairs]\nnum_pairs = 4\nsteps = 3\nbatch_size = 4\n\
             [train]\nbatch_size = 2\nregression_batch_size = 2\ntotal_steps = 6\nfake_updates_per_generator_update = 2\n\
             generator_lr = 1e-4\nfake_lr = 1e-4\nema_decay = 0.9\nlog_every = 2\ncheckpoint_every = 2\nsample_every = 0\n",
            s(out),
            s(&sd)
        )
    };
    let straight = tmp.join("straight");
    let cfg = tmp.join("straight.toml");
    std::fs::write(&cfg, config(&straight)).unwrap();
    let log = ok(&dmd(&["distill", "--config", s(&cfg)]));
    assert!(log.contains("text-to-image"), "{log}");
    let lines = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["dm_loss", "regression_loss", "gan_generator_loss", "fake_loss", "gan_discriminator_loss"] {
            assert!(v[key].as_f64().is_some_and(f64::is_finite), "{key} in {line}");
        }
    }

    // Interrupted after 3 steps, then resumed to 6: the same bits as straight through.
    let resumed = tmp.join("resumed");
    let cfg2 = tmp.join("resumed.toml");
    std::fs::write(&cfg2, config(&resumed)).unwrap();
    ok(&dmd(&["distill", "--config", s(&cfg2), "--steps", "3"]));
    let log = ok(&dmd(&["distill", "--config", s(&cfg2)]));
    assert!(log.contains("resuming") && log.contains("from step 3"), "{log}");
    let weights = |dir: &Path| std::fs::read(dir.join("generator/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&resumed), "resumed generator differs from the uninterrupted one");
    for name in ["fake", "generator"] {
        let a = std::fs::read(straight.join("checkpoint").join(name).join("diffusion_pytorch_model.safetensors")).unwrap();
        let b = std::fs::read(resumed.join("checkpoint").join(name).join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(a == b, "checkpoint {name} differs after resume");
    }
    // Two micro-batches of one prompt each: the straight run's weights to float rounding, over
    // each network as a whole (measured: up to 1.2e-5, while the 6 steps moved the networks by
    // 2.4e-3..4.1e-3). Not tensor by tensor: this UNet's 32-channel blocks have one channel per
    // GroupNorm group, so the biases added just before a norm have a true gradient of zero, and
    // Adam turns its rounding noise into full-size steps (up to 7e-5 per tensor).
    // Two data-parallel replicas for 3 steps, resumed as one replica of two micro-batches: the
    // micro-batched run's bits exactly (the same parts, summed in the same order).
    let unet = |dir: &Path, name: &str| dir.join("checkpoint").join(name).join("diffusion_pytorch_model.safetensors");
    let micro = tmp.join("micro");
    std::fs::write(tmp.join("micro.toml"), config(&micro).replace("[train]\n", "[train]\nmicro_batches = 2\n")).unwrap();
    ok(&dmd(&["distill", "--config", s(&tmp.join("micro.toml"))]));
    let dp = tmp.join("dp");
    for (split, steps) in [("devices = 2", "3"), ("micro_batches = 2", "6")] {
        std::fs::write(tmp.join("dp.toml"), config(&dp).replace("[train]\n", &format!("[train]\n{split}\n"))).unwrap();
        ok(&dmd(&["distill", "--config", s(&tmp.join("dp.toml")), "--steps", steps]));
    }
    for name in ["generator", "fake", "generator_ema"] {
        let err = files_rel_l2(&unet(&micro, name), &unet(&straight, name));
        eprintln!("{name}: micro-batches vs one batch, relative L2 error {err:.3e}");
        assert!(err < 5e-5, "{name}: micro-batches vs one batch, relative L2 error {err:.3e}");
        assert_files_close(name, &unet(&dp, name), &unet(&micro, name), 0.0);
    }
    assert_files_close("gan_head", &dp.join("checkpoint/gan_head.safetensors"), &micro.join("checkpoint/gan_head.safetensors"), 0.0);

    // The generator moved away from the teacher.
    let g = read(&straight.join("generator/diffusion_pytorch_model.safetensors"));
    let t = read(&sd.join("unet/diffusion_pytorch_model.safetensors"));
    let key = "conv_out.weight";
    assert!(rel_l2(&get(&g, key).data, &get(&t, key).data) > 0.0, "generator equals the teacher");

    // Changed pair settings with --force-resume: the stored pairs are refused as stale.
    let stale = tmp.join("stale.toml");
    std::fs::write(&stale, config(&straight).replace("steps = 3\n", "steps = 4\n")).unwrap();
    let o = dmd(&["distill", "--config", s(&stale), "--force-resume", "--steps", "8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pairs.safetensors") && err.contains("delete"), "{err}");

    // `dmd txt2img --generator` draws what the library's one-step generation gives.
    let tensors = tmp.join("one_step.safetensors");
    let prompts = ["a red fox in the snow", "a bowl of soup"];
    ok(&dmd(&["txt2img", "--teacher", s(&sd), "--generator", s(&straight.join("generator")), "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "5", "--out", s(&tensors)]));
    let device = Device::flex();
    let pipe = dmd_models::sd::pipeline::StableDiffusion::load(&sd, &device).unwrap();
    let generator = UNet2DCondition::load(&straight.join("generator"), &device).unwrap();
    let want = dmd_experiments::sd_distill::one_step_images(&pipe, &generator, &prompts.map(String::from), 5, 999);
    assert_close("txt2img --generator vs one_step_images", get(&read(&tensors), "images"), &want, 1e-6);

    // One-step generation from the distilled generator, and the teacher's guided DDIM.
    let png = tmp.join("one_step.png");
    let out = ok(&dmd(&["txt2img", "--teacher", s(&sd), "--generator", s(&straight.join("generator")), "--prompt", "a red fox in the snow", "--prompt", "a bowl of soup", "--out", s(&png)]));
    assert!(out.contains("1 UNet call"), "{out}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 32)); // two 32x32 tiles side by side
    let png = tmp.join("teacher.png");
    let out = ok(&dmd(&["txt2img", "--teacher", s(&sd), "--scheduler", "ddim", "--steps", "4", "--guidance", "3", "--prompt", "a lighthouse", "--out", s(&png)]));
    assert!(out.contains("8 UNet call"), "{out}");

    // Bad input: one line naming what is wrong.
    let bad = tmp.join("bad.toml");
    std::fs::write(&bad, config(&tmp.join("bad")).replace("guidance_scale = 1.75", "guidance_scale = 0.5")).unwrap();
    let o = dmd(&["distill", "--config", s(&bad)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("sd.guidance_scale") && err.lines().count() == 1, "{err}");
    let o = dmd(&["txt2img", "--teacher", s(&sd), "--steps", "1000", "--prompt", "x", "--out", s(&tmp.join("x.png"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--steps") && err.lines().count() == 1, "{err}");
    let o = dmd(&["txt2img", "--teacher", s(&tmp), "--prompt", "x", "--out", s(&tmp.join("x.png"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tokenizer"), "{err}");
}

#[test]
fn shipped_text_to_image_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs/sd");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            assert!(dmd_experiments::sd_distill::is_text_config(&p), "{}", p.display());
            let cfg = dmd_experiments::sd_distill::TextDistillConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(cfg.sd.guidance_scale >= 1.0);
            n += 1;
        }
    }
    assert!(n >= 3, "expected the shipped SD configs in {}", dir.display());
    // A partial [train] keeps SD's defaults for the keys it does not give.
    let p = scratch("sd_partial_train").join("c.toml");
    std::fs::write(&p, "out_dir = \"x\"\n[sd]\ndir = \"sd\"\n[train]\ntotal_steps = 5\n").unwrap();
    let cfg = dmd_experiments::sd_distill::TextDistillConfig::from_file(&p).unwrap();
    assert_eq!((cfg.train.total_steps, cfg.train.generator_lr, cfg.train.fake_lr, cfg.train.batch_size), (5, 1e-5, 1e-5, 4));
    std::fs::write(&p, "out_dir = \"x\"\n[sd]\ndir = \"sd\"\n[train]\nbatch_sise = 5\n").unwrap();
    let err = format!("{:#}", dmd_experiments::sd_distill::TextDistillConfig::from_file(&p).unwrap_err());
    assert!(err.contains("batch_sise"), "{err}");
}

/// SD v1.5 at full size with random weights (CLIP ViT-L/14 text tower, the 860M UNet, the VAE
/// at 512x512; ~4.3 GB of float32): one-step generation of one 512x512 image, and one guided
/// UNet call of the teacher's sampler, timed on flex. Ignored by default (minutes, memory):
/// `cargo test --test sd full_size -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_size_sd15_one_step_and_teacher_call() {
    use dmd_models::nn::Init;
    use dmd_models::sd::clip::{ClipTextConfig, ClipTextModel};
    use dmd_models::sd::pipeline::{guided_eps, StableDiffusion};
    use dmd_models::sd::tokenizer::ClipTokenizer;
    use dmd_models::sd::unet::UNetConfig;
    use dmd_models::sd::vae::{AutoencoderKL, VaeConfig};
    use std::time::Instant;
    let Some(dir) = reference_dir("sd") else { return };
    let device = Device::flex();
    let t0 = Instant::now();
    let vae_cfg = VaeConfig::from_json_str(
        r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "sample_size": 512,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let sd = StableDiffusion {
        tokenizer: ClipTokenizer::load(&dir.join("tokenizer")).unwrap(),
        text_encoder: ClipTextModel::new(&ClipTextConfig::sd15(), &mut Init::new(&device, 1)),
        unet: UNet2DCondition::new(&UNetConfig::sd15(), &mut Init::new(&device, 2)),
        vae: AutoencoderKL::new(&vae_cfg, &mut Init::new(&device, 3)),
        scheduler: SchedulerConfig::default(),
        device: device.clone(),
    };
    eprintln!("built SD v1.5 (random weights) in {:.1} s", t0.elapsed().as_secs_f64());
    let prompts = vec!["a red fox in the snow".to_string()];
    let t0 = Instant::now();
    let images = dmd_experiments::sd_distill::one_step_images(&sd, &sd.unet, &prompts, 0, 999);
    let one_step = t0.elapsed().as_secs_f64();
    assert_eq!(images.shape, [1, 3, 512, 512]);
    assert!(images.data.iter().all(|v| v.is_finite()));
    let z = dmd_experiments::sd_distill::seeded_latents(&[0], sd.latent_shape(), &device);
    let (cond, uncond) = (sd.encode_prompts(&prompts), sd.encode_prompts(&[String::new()]));
    let t0 = Instant::now();
    let eps = guided_eps(&sd.unet, z, Tensor::full([1], 981.0, &device), cond, uncond, 3.0);
    let _ = eps.into_data();
    let call = t0.elapsed().as_secs_f64();
    eprintln!(
        "full-size SD v1.5 on flex: one-step image (text encoding, 1 UNet call, VAE decode to 512x512) {one_step:.1} s; \
         one guided teacher step (2 UNet calls) {call:.1} s -> 50-step PNDM (51 guided steps) about {:.0} s per image, {:.0}x the one-step time",
        51.0 * call + one_step,
        (51.0 * call + one_step) / one_step
    );
}
