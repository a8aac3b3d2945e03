//! `dmd train-teacher` on a built-in toy distribution: the teacher must learn the data (mode
//! coverage and energy distance against fresh samples), and a resumed run must repeat the
//! uninterrupted one exactly.

mod common;

use common::*;
use dmd_experiments::teacher::{train, TeacherConfig};
use std::path::Path;
use std::process::Command;

fn toy_config(out: &Path, hidden: usize, steps: usize) -> String {
    format!(
        r#"
out_dir = "{}"
[data]
kind = "toy"
name = "eight_gaussians"
[network]
model_type = "ToyMLP"
hidden_dim = {hidden}
num_layers = 3
[train]
batch_size = 256
total_steps = {steps}
lr = 4e-3
lr_rampup_kimg = 12.8
ema_halflife_kimg = 12.8
log_every = 10
checkpoint_every = 10
sample_every = 0
[eval]
num_samples = 1000
[eval.sampler]
num_steps = 18
"#,
        out.display()
    )
}

#[test]
fn toy_teacher_learns_eight_gaussians() {
    let tmp = scratch("teacher_toy");
    let cfg: TeacherConfig = toml::from_str(&toy_config(&tmp.join("run"), 128, 2000)).unwrap();
    let run = train(&cfg, false, false).unwrap();
    let e = run.eval.expect("toy runs are evaluated");
    eprintln!("{}", e.summary());
    let m = e.modes.as_ref().unwrap();
    let d = e.modes_data.as_ref().unwrap();
    // An untrained network scatters a blob around the origin: 1-2 modes "covered", few
    // points near a mode, energy distance ~0.03.
    assert_eq!(m.modes_covered, 8, "all eight modes");
    assert!(m.frac_near_mode > 0.85 && d.frac_near_mode > 0.97, "samples near the modes: {} (data {})", m.frac_near_mode, d.frac_near_mode);
    assert!(m.mode_kl < 0.05, "balanced modes: KL {}", m.mode_kl);
    assert!(e.energy_distance < 0.005, "energy distance {}", e.energy_distance);
    assert!(run.teacher.exists() && run.teacher.with_extension("json").exists());
}

fn dmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap()
}

#[test]
fn resumed_run_repeats_the_uninterrupted_one() {
    let tmp = scratch("teacher_resume");
    let straight = tmp.join("straight");
    let resumed = tmp.join("resumed");
    for (dir, name) in [(&straight, "a.toml"), (&resumed, "b.toml")] {
        std::fs::write(tmp.join(name), toy_config(dir, 32, 30)).unwrap();
    }
    let cfg_a = tmp.join("a.toml");
    let cfg_b = tmp.join("b.toml");
    let o = dmd(&["train-teacher", "--config", cfg_a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Stop after 20 steps, then continue to 30 from the checkpoint.
    let o = dmd(&["train-teacher", "--config", cfg_b.to_str().unwrap(), "--steps", "20"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = dmd(&["train-teacher", "--config", cfg_b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming") && err.contains("from step 20"), "{err}");
    for f in ["checkpoint/net.safetensors", "checkpoint/ema.safetensors", "teacher.safetensors"] {
        let a = read(&straight.join(f));
        let b = read(&resumed.join(f));
        assert_eq!(a.tensors, b.tensors, "{f} differs between the straight and the resumed run");
    }
    let steps = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&straight), vec![10, 20, 30]);
    assert_eq!(steps(&resumed), vec![10, 20, 30]);

    // Steps 0..20 with `key = first`, then resumed to 30 with `key = second`.
    let split_run = |name: &str, key: &str, first: usize, second: usize| {
        let dir = tmp.join(name);
        let cfg = tmp.join(format!("{name}.toml"));
        for (n, steps) in [(first, Some("20")), (second, None)] {
            std::fs::write(&cfg, toy_config(&dir, 32, 30).replace("batch_size = 256", &format!("batch_size = 256\n{key} = {n}"))).unwrap();
            let mut args = vec!["train-teacher", "--config", cfg.to_str().unwrap()];
            args.extend(steps.map(|s| ["--steps", s]).into_iter().flatten());
            let o = dmd(&args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        dir
    };
    // The same batches as micro-batches (256 = 86 + 85 + 85, then 128 + 128 after a resume):
    // the same weights to float rounding (measured: 7e-8).
    let micro = split_run("micro", "micro_batches", 3, 2);
    for f in ["checkpoint/net.safetensors", "teacher.safetensors"] {
        assert_files_close(f, &micro.join(f), &straight.join(f), 1e-5);
    }
    // Data-parallel replicas (3, then 2 after the resume) run the same parts and sum them in
    // the same order: bit-identical to the micro-batched run.
    let dp = split_run("dp", "devices", 3, 2);
    for f in ["checkpoint/net.safetensors", "checkpoint/ema.safetensors", "teacher.safetensors"] {
        assert_files_close(f, &dp.join(f), &micro.join(f), 0.0);
    }
    assert_eq!(steps(&dp), vec![10, 20, 30]);
}

#[test]
fn bad_configs_give_one_line_errors() {
    let tmp = scratch("teacher_bad_config");
    let good = toy_config(&tmp.join("run"), 32, 5);
    let cases = [
        (good.replace("lr = 4e-3", "lr = 4e-3\nlearning_rate = 1"), vec!["bad.toml", "learning_rate"]),
        (good.replace("hidden_dim = 32", "hidden_dim = 32\nchannel_mult = [1, 2]"), vec!["channel_mult"]),
        (good.replace("name = \"eight_gaussians\"", "name = \"nine_gaussians\""), vec!["bad.toml", "nine_gaussians"]),
        (good.replace("lr = 4e-3", "lr = -1.0"), vec!["bad.toml", "train.lr"]),
    ];
    for (text, needles) in cases {
        let path = tmp.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let o = dmd(&["train-teacher", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        for n in needles {
            assert!(err.contains(n), "should name `{n}`: {err}");
        }
    }
}

#[test]
fn unet_teacher_trains_on_an_edm_dataset_and_samples() {
    let tmp = scratch("teacher_unet");
    // A small labelled dataset in EDM's format.
    let data = tmp.join("data");
    std::fs::create_dir_all(data.join("00000")).unwrap();
    let mut labels = Vec::new();
    for i in 0..6u32 {
        let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30 + i * 5) as u8, (y * 30) as u8, (i * 40) as u8]));
        let name = format!("00000/img{i:08}.png");
        img.save(data.join(&name)).unwrap();
        labels.push(serde_json::json!([name, i % 3]));
    }
    std::fs::write(data.join("dataset.json"), serde_json::json!({ "labels": labels }).to_string()).unwrap();
    let run = tmp.join("run");
    let config = format!(
        r#"
out_dir = "{}"
[data]
kind = "edm"
path = "{}"
conditional = true
[network]
model_type = "SongUNet"
model_channels = 16
channel_mult = [1, 2]
num_blocks = 1
attn_resolutions = [4]
dropout = 0.1
label_dropout = 0.1
[train]
batch_size = 4
total_steps = 3
lr_rampup_kimg = 0.01
checkpoint_every = 2
sample_every = 3
"#,
        run.display(),
        data.display()
    );
    let cfg_path = tmp.join("unet.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let o = dmd(&["train-teacher", "--config", cfg_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("samples/step-0000003.png").exists());
    let teacher = run.join("teacher.safetensors");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("teacher.json")).unwrap()).unwrap();
    assert_eq!((cfg["img_resolution"].as_u64(), cfg["label_dim"].as_u64()), (Some(8), Some(3)));
    let out = tmp.join("s.safetensors");
    let o = dmd(&["sample", "--teacher", teacher.to_str().unwrap(), "--seeds", "0-1", "--class", "1", "--steps", "3", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let images = read(&out);
    let x = get(&images, "images");
    assert_eq!(x.shape, [2, 3, 8, 8]);
    assert!(x.data.iter().all(|v| v.is_finite()));
}
