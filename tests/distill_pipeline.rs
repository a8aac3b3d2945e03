//! The distillation pipeline end to end on a built-in toy: train a teacher, write teacher pairs
//! (resumable), distil with the DMD recipe and with a DMD2 recipe (TTUR, GAN on real data, a
//! two-step generator with backward simulation), and check that a resumed distillation repeats
//! the uninterrupted one exactly (every network, head and optimiser).

mod common;

use common::*;
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
fn teacher_pairs_distill_and_exact_resume() {
    let tmp = scratch("distill_pipeline");
    let teacher_cfg = tmp.join("teacher.toml");
    std::fs::write(
        &teacher_cfg,
        format!(
            "out_dir = \"{}\"\n[data]\nkind = \"toy\"\nname = \"eight_gaussians\"\n[network]\nmodel_type = \"ToyMLP\"\nhidden_dim = 32\nnum_layers = 2\n\
             [train]\nbatch_size = 64\ntotal_steps = 20\nsample_every = 0\n[eval]\nnum_samples = 100\n",
            s(&tmp.join("teacher"))
        ),
    )
    .unwrap();
    ok(&dmd(&["train-teacher", "--config", s(&teacher_cfg)]));
    let teacher = tmp.join("teacher/teacher.safetensors");

    // Pairs: 100 in shards of 40; a second call finds them done and changes nothing.
    let pairs = tmp.join("pairs");
    let args = ["make-pairs", "--teacher", s(&teacher), "--num", "100", "--steps", "4", "--shard-size", "40", "--out", s(&pairs)];
    ok(&dmd(&args));
    let first = read(&pairs.join("pairs-000002.safetensors"));
    assert_eq!(get(&first, "images").shape, [20, 2, 1, 1]);
    std::fs::remove_file(pairs.join("pairs-000001.safetensors")).unwrap();
    ok(&dmd(&args)); // resumes: rewrites the missing shard only
    assert_eq!(read(&pairs.join("pairs-000002.safetensors")).tensors, first.tensors);
    // The pairs are the teacher's 4-step Heun samples of the same seeds.
    let check = tmp.join("check.safetensors");
    ok(&dmd(&["sample", "--teacher", s(&teacher), "--seeds", "80-99", "--steps", "4", "--out", s(&check)]));
    assert_close("pairs vs dmd sample", get(&first, "images"), get(&read(&check), "images"), 1e-6);

    let distill_cfg = |dir: &str| {
        format!(
            "out_dir = \"{}\"\npairs = \"{}\"\n[teacher]\nweights = \"{}\"\n[loss]\nregression = \"l2\"\n\
             [train]\nbatch_size = 16\nregression_batch_size = 8\ntotal_steps = 6\nfake_updates_per_generator_update = 2\nema_decay = 0.9\nlog_every = 2\ncheckpoint_every = 2\n\
             [eval]\ntoy = \"eight_gaussians\"\nnum_samples = 50\n",
            s(&tmp.join(dir)),
            s(&pairs),
            s(&teacher)
        )
    };
    for name in ["straight", "resumed"] {
        std::fs::write(tmp.join(format!("{name}.toml")), distill_cfg(name)).unwrap();
    }
    ok(&dmd(&["distill", "--config", s(&tmp.join("straight.toml"))]));
    ok(&dmd(&["distill", "--config", s(&tmp.join("resumed.toml")), "--steps", "3"]));
    let err = ok(&dmd(&["distill", "--config", s(&tmp.join("resumed.toml"))]));
    assert!(err.contains("from step 3"), "{err}"); // a run always checkpoints its last step
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/generator_ema.safetensors", "generator.safetensors"] {
        assert_eq!(read(&tmp.join("straight").join(f)).tensors, read(&tmp.join("resumed").join(f)).tensors, "{f}");
    }
    // Micro-batches (16 = 6 + 5 + 5, regression 8 = 3 + 3 + 2; resumed at step 3 with 2 parts)
    // give the straight run's weights to float rounding (measured: up to 1.2e-7; weighting the
    // parts equally instead of by their rows, a plausible slip, gave 6.5e-5).
    std::fs::write(tmp.join("micro.toml"), distill_cfg("micro").replace("batch_size = 16", "batch_size = 16\nmicro_batches = 3")).unwrap();
    ok(&dmd(&["distill", "--config", s(&tmp.join("micro.toml")), "--steps", "3"]));
    std::fs::write(tmp.join("micro.toml"), distill_cfg("micro").replace("batch_size = 16", "batch_size = 16\nmicro_batches = 2")).unwrap();
    ok(&dmd(&["distill", "--config", s(&tmp.join("micro.toml"))]));
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/generator_ema.safetensors"] {
        assert_files_close(f, &tmp.join("micro").join(f), &tmp.join("straight").join(f), 1e-5);
    }
    // Three replicas (data-parallel, resumed from micro's checkpoint at step 3 with another
    // device count) against three micro-batches throughout: the same parts, the same sums.
    std::fs::write(tmp.join("micro3.toml"), distill_cfg("micro3").replace("batch_size = 16", "batch_size = 16\nmicro_batches = 3")).unwrap();
    ok(&dmd(&["distill", "--config", s(&tmp.join("micro3.toml"))]));
    std::fs::write(tmp.join("dp3.toml"), distill_cfg("dp3").replace("batch_size = 16", "batch_size = 16\nmicro_batches = 3")).unwrap();
    ok(&dmd(&["distill", "--config", s(&tmp.join("dp3.toml")), "--steps", "3"]));
    std::fs::write(tmp.join("dp3.toml"), distill_cfg("dp3").replace("batch_size = 16", "batch_size = 16\ndevices = 3")).unwrap();
    let err = ok(&dmd(&["distill", "--config", s(&tmp.join("dp3.toml"))]));
    assert!(err.contains("from step 3") && err.contains("on 3 x cpu"), "{err}");
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/generator_ema.safetensors", "generator.safetensors"] {
        assert_files_close(f, &tmp.join("dp3").join(f), &tmp.join("micro3").join(f), 0.0);
    }

    // The generator samples in one step through `dmd sample --generator`.
    let out = tmp.join("gen.safetensors");
    ok(&dmd(&["sample", "--generator", s(&tmp.join("straight/generator.safetensors")), "--seeds", "0-9", "--out", s(&out)]));
    assert_eq!(get(&read(&out), "images").shape, [10, 2, 1, 1]);

    // DMD2: no regression, TTUR, GAN term on real data, a two-step generator trained on its own
    // samples, bfloat16 network bodies; resumed exactly too (GAN head and its optimiser
    // included: the optimiser files store a hash map, so their bytes vary; identical weights
    // after further steps show the moments were restored).
    let dmd2_cfg = |dir: &str| {
        format!(
            "out_dir = \"{}\"\n[teacher]\nweights = \"{}\"\n[data]\nkind = \"toy\"\nname = \"eight_gaussians\"\n\
             [generator]\nsteps = 2\n[loss]\ngan_generator_weight = 0.003\ngan_discriminator_weight = 0.01\n\
             [train]\nbatch_size = 16\ntotal_steps = 6\nfake_updates_per_generator_update = 2\nbf16_body = true\nlog_every = 2\ncheckpoint_every = 2\nsample_every = 3\n\
             [eval]\ntoy = \"eight_gaussians\"\nnum_samples = 50\n",
            s(&tmp.join(dir)),
            s(&teacher)
        )
    };
    for name in ["dmd2_straight", "dmd2_resumed"] {
        std::fs::write(tmp.join(format!("{name}.toml")), dmd2_cfg(name)).unwrap();
    }
    ok(&dmd(&["distill", "--config", s(&tmp.join("dmd2_straight.toml"))]));
    ok(&dmd(&["distill", "--config", s(&tmp.join("dmd2_resumed.toml")), "--steps", "3"]));
    ok(&dmd(&["distill", "--config", s(&tmp.join("dmd2_resumed.toml"))]));
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/gan_head.safetensors", "generator.safetensors"] {
        assert_eq!(read(&tmp.join("dmd2_straight").join(f)).tensors, read(&tmp.join("dmd2_resumed").join(f)).tensors, "{f}");
    }
    // The DMD2 recipe (GAN on real data, backward simulation, TTUR) in 4 micro-batches against
    // one batch, both in float32.
    for (name, micro) in [("dmd2_f32", 1), ("dmd2_micro", 4)] {
        let cfg = dmd2_cfg(name).replace("bf16_body = true", &format!("micro_batches = {micro}"));
        std::fs::write(tmp.join(format!("{name}.toml")), cfg).unwrap();
        ok(&dmd(&["distill", "--config", s(&tmp.join(format!("{name}.toml")))]));
    }
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/gan_head.safetensors"] {
        assert_files_close(f, &tmp.join("dmd2_micro").join(f), &tmp.join("dmd2_f32").join(f), 1e-5);
    }
    // Data-parallel: 4 replicas run the same 4 parts and sum their gradients in the same order
    // as one replica does, so the weights are bit-identical (resumed at step 3 as one replica
    // of 4 micro-batches).
    for (devices, steps) in [("devices = 4", "3"), ("micro_batches = 4", "6")] {
        std::fs::write(tmp.join("dmd2_dp.toml"), dmd2_cfg("dmd2_dp").replace("bf16_body = true", devices)).unwrap();
        ok(&dmd(&["distill", "--config", s(&tmp.join("dmd2_dp.toml")), "--steps", steps]));
    }
    for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/gan_head.safetensors", "generator.safetensors"] {
        assert_files_close(f, &tmp.join("dmd2_dp").join(f), &tmp.join("dmd2_micro").join(f), 0.0);
    }
    let metrics = std::fs::read_to_string(tmp.join("dmd2_straight/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["gan_discriminator_loss", "gan_generator_loss", "dm_loss", "fake_loss"] {
            assert!(v[key].as_f64().is_some_and(f64::is_finite), "{key} missing in {line}");
        }
    }
    assert!(tmp.join("dmd2_straight/samples/step-0000003.png").is_file());
    // The file carries both noise levels: `dmd sample --generator` runs two steps (80, then
    // the grid's index 499), which differ from one call at sigma 80.
    let g2 = tmp.join("dmd2_straight/generator.safetensors");
    let meta = dmd_models::NamedTensors::read(&g2).unwrap().metadata;
    let sigmas: Vec<f64> = serde_json::from_str(&meta["dmd_generator_sigmas"]).unwrap();
    assert_eq!(sigmas.len(), 2);
    assert_eq!(sigmas[0], 80.0);
    assert!((sigmas[1] - dmd_losses::dmd::NoiseGrid::default().sigmas()[499] as f64).abs() < 1e-6);
    let two = tmp.join("two.safetensors");
    ok(&dmd(&["sample", "--generator", s(&g2), "--seeds", "0-9", "--out", s(&two)]));
    let one_step = dmd_experiments::distill::generator_samples(
        &dmd_models::EdmPrecond::load(&g2, &g2.with_extension("json"), &burn::tensor::Device::flex(), "g").unwrap(),
        &burn::tensor::Device::flex(),
        10,
        0,
        &[80.0],
    );
    assert_ne!(get(&read(&two), "images").data, one_step.data);
}

/// DMD's image recipe wired end to end: pairs from an EDM image teacher (`adm_tiny`), then a
/// distillation with the LPIPS regression (upsampled to 224, VGG16 + v0.1 heads from files).
#[test]
fn lpips_regression_on_images() {
    let (Some(edm), Some(eval)) = (reference_dir("edm"), reference_dir("eval")) else { return };
    let tmp = scratch("distill_lpips");
    let teacher = edm.join("adm_tiny.safetensors");
    let pairs = tmp.join("pairs");
    ok(&dmd(&["make-pairs", "--teacher", s(&teacher), "--num", "4", "--steps", "2", "--out", s(&pairs)]));
    let cfg = tmp.join("lpips.toml");
    std::fs::write(
        &cfg,
        format!(
            "out_dir = \"{}\"\npairs = \"{}\"\n[teacher]\nweights = \"{}\"\n\
             [loss]\nregression = \"lpips\"\nlpips_vgg = \"{}\"\nlpips_heads = \"{}\"\n\
             [train]\nbatch_size = 2\nregression_batch_size = 2\ntotal_steps = 2\nlog_every = 1\nsample_every = 2\n",
            s(&tmp.join("run")),
            s(&pairs),
            s(&teacher),
            s(&eval.join("vgg16_features_random.safetensors")),
            s(&eval.join("lpips_vgg_v0.1_lin.safetensors"))
        ),
    )
    .unwrap();
    ok(&dmd(&["distill", "--config", s(&cfg)]));
    let metrics = std::fs::read_to_string(tmp.join("run/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let r = v["regression_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(r.is_finite() && r > 0.0, "LPIPS regression loss in {line}");
    }
    assert!(tmp.join("run/samples/step-0000002.png").is_file());
    // A missing LPIPS file is one line naming it.
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("vgg16_features_random", "nope").replace("/run\"", "/run2\"")).unwrap();
    let o = dmd(&["distill", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope.safetensors") && err.lines().count() == 1, "{err}");
}
