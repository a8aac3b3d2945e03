//! Every experiment config under experiments/configs/ parses and runs its first iterations
//! through `dmd run` on ndarray, shrunk by `--set` overrides: a tiny random teacher in place of
//! EDM's checkpoints, tiny datasets in place of ImageNet and Fashion-MNIST, 2 pairs of 2 Heun
//! steps, 2 distillation steps of batch 2. The toy experiment runs end to end (evaluation,
//! results folder); a rerun skips every finished stage; `dmd ablate` writes its table.

mod common;

use burn::tensor::Device;
use common::*;
use dmd_models::{EdmConfig, EdmPrecond};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs")
}

/// Every experiment config: the TOML files of the experiment folders (not teacher/, networks/
/// or ablations/).
fn experiment_configs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["toy", "fashion_mnist", "cifar10", "imagenet64"] {
        for e in std::fs::read_dir(configs_dir().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn dmd(args: &[String], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).current_dir(cwd).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A tiny class-conditional ADM on 8x8 RGB with random weights, saved with its config.
fn tiny_teacher(path: &Path) {
    let cfg = EdmConfig::from_json_str(
        r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 10, "model_type": "DhariwalUNet",
            "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}"#,
    )
    .unwrap();
    #[allow(deprecated)]
    let net = EdmPrecond::new(&cfg, &Device::ndarray(), 7);
    net.save(path).unwrap();
}

/// Ten labelled 8x8 RGB images in EDM's folder format.
fn tiny_edm_dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("00000")).unwrap();
    let mut labels = Vec::new();
    for i in 0..10u32 {
        let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30 + i * 5) as u8, (y * 30) as u8, (i * 25) as u8]));
        let name = format!("00000/img{i:08}.png");
        img.save(dir.join(&name)).unwrap();
        labels.push(serde_json::json!([name, i]));
    }
    std::fs::write(dir.join("dataset.json"), serde_json::json!({ "labels": labels }).to_string()).unwrap();
}

/// Ten 28x28 images and their labels as IDX files, like Fashion-MNIST's.
fn tiny_idx(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let n = 10usize;
    let mut images = vec![0, 0, 8, 3];
    for d in [n, 28, 28] {
        images.extend((d as u32).to_be_bytes());
    }
    images.extend((0..n * 28 * 28).map(|i| (i * 7 % 256) as u8));
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    labels.extend((0..n as u8).collect::<Vec<_>>());
    let (pi, pl) = (dir.join("images-idx3-ubyte"), dir.join("labels-idx1-ubyte"));
    std::fs::File::create(&pi).unwrap().write_all(&images).unwrap();
    std::fs::File::create(&pl).unwrap().write_all(&labels).unwrap();
    (pi, pl)
}

/// The overrides that shrink one experiment to seconds on ndarray.
fn shrink(config: &Path, tmp: &Path, teacher: &Path, images: &Path, idx: &(PathBuf, PathBuf)) -> Vec<String> {
    let table = dmd_experiments::experiment::load_table(config, &[]).unwrap();
    let name = table["name"].as_str().unwrap().to_string();
    let q = |p: &Path| format!("\"{}\"", p.display());
    let mut set = vec![
        format!("work_dir={}", q(&tmp.join("runs").join(&name))),
        format!("results_dir={}", q(&tmp.join("results").join(&name))),
        "distill.train.total_steps=2".into(),
        "distill.train.batch_size=2".into(),
        "distill.train.regression_batch_size=2".into(),
        "distill.train.log_every=1".into(),
        "distill.train.checkpoint_every=1".into(),
        "distill.train.sample_every=0".into(),
        // ndarray has no bfloat16; mixed precision is tested in mixed_precision.rs.
        "distill.train.bf16_body=false".into(),
        "eval.num_samples=4".into(),
        "eval.batch=4".into(),
        "eval.grid_seeds=4".into(),
        "eval.teacher_steps=2".into(),
    ];
    if let Some(train) = table["teacher"].get("train") {
        set.push(format!("teacher.train.out_dir={}", q(&tmp.join("teachers").join(&name))));
        set.extend(["teacher.train.train.total_steps=2", "teacher.train.train.batch_size=4", "teacher.train.train.checkpoint_every=1", "teacher.train.train.sample_every=0", "teacher.train.train.log_every=1"].map(String::from));
        if train["data"]["kind"].as_str() == Some("idx") {
            // Fashion-MNIST's files may be absent here: ten IDX images, padded and pooled the same.
            set.push(format!("teacher.train.data.images={}", q(&idx.0)));
            set.push(format!("teacher.train.data.labels={}", q(&idx.1)));
            set.push("teacher.train.network.model_channels=8".into());
        }
    } else {
        set.push(format!("teacher.weights={}", q(teacher)));
    }
    if table.contains_key("pairs") {
        set.extend(["pairs.num=2", "pairs.steps=2", "pairs.batch=2", "pairs.shard_size=2"].map(String::from));
    }
    let distill = table["distill"].as_table().unwrap();
    if distill.get("loss").and_then(|l| l.get("regression")).and_then(|r| r.as_str()) == Some("lpips") {
        // LPIPS needs VGG16 (not shipped); the LPIPS loss is tested in distill_pipeline.rs.
        set.push("distill.loss.regression=\"l2\"".into());
    }
    if distill.get("data").and_then(|d| d.get("kind")).and_then(|k| k.as_str()) == Some("edm") {
        set.push(format!("distill.data.path={}", q(images)));
    }
    if let Some(init) = distill.get("init_from").and_then(|v| v.as_str()) {
        // The second stage starts from the first stage's checkpoint in this scratch folder.
        set.push(format!("distill.init_from={}", q(&tmp.join(init))));
    }
    set
}

#[test]
fn every_experiment_config_runs_its_first_iterations() {
    let tmp = scratch("experiment_configs");
    let teacher = tmp.join("tiny-adm.safetensors");
    tiny_teacher(&teacher);
    let images = tmp.join("images");
    tiny_edm_dataset(&images);
    let idx = tiny_idx(&tmp.join("idx"));
    let configs = experiment_configs();
    assert!(configs.len() >= 25, "expected every paper setting and ablation, found {}", configs.len());
    // Stage-one runs first (dmd2.toml sorts before dmd2_stage2.toml); the stage-two config's
    // init_from points at runs/imagenet64-dmd2 under the scratch folder.
    for config in &configs {
        let mut set = shrink(config, &tmp, &teacher, &images, &idx);
        let is_toy_dmd = config.ends_with("toy/eight_gaussians_dmd.toml");
        if config.ends_with("imagenet64/dmd2.toml") {
            set[0] = format!("work_dir=\"{}\"", tmp.join("runs/imagenet64-dmd2").display());
        }
        let mut args = vec!["run".to_string(), config.display().to_string(), "--device".into(), "ndarray".into()];
        if !is_toy_dmd {
            args.extend(["--until".into(), "distill".into()]);
        }
        for s in &set {
            args.extend(["--set".into(), s.clone()]);
        }
        let o = dmd(&args, &tmp);
        assert!(o.status.success(), "{}: {}", config.display(), text(&o));
        let work = set[0].trim_start_matches("work_dir=").trim_matches('"').to_string();
        let log = std::fs::read_to_string(Path::new(&work).join("distill/metrics.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 2, "{}: two logged steps", config.display());
        assert!(Path::new(&work).join("distill/generator.safetensors").exists(), "{}", config.display());
        eprintln!("ok: {}", config.display());
    }
}

#[test]
fn toy_experiment_writes_results_and_skips_finished_stages() {
    let tmp = scratch("experiment_toy");
    let config = configs_dir().join("toy/eight_gaussians_dmd.toml");
    let results = tmp.join("results/toy");
    let set = [
        format!("work_dir=\"{}\"", tmp.join("runs/toy").display()),
        format!("results_dir=\"{}\"", results.display()),
        format!("teacher.train.out_dir=\"{}\"", tmp.join("teacher").display()),
        "teacher.train.train.total_steps=20".into(),
        "teacher.train.train.log_every=5".into(),
        "teacher.train.train.sample_every=0".into(),
        "teacher.train.eval.num_samples=50".into(),
        "pairs.num=8".into(),
        "distill.train.total_steps=6".into(),
        "distill.train.batch_size=16".into(),
        "distill.train.regression_batch_size=8".into(),
        "distill.train.log_every=2".into(),
        "eval.num_samples=64".into(),
        "eval.batch=32".into(),
    ];
    let mut args = vec!["run".to_string(), config.display().to_string()];
    for s in &set {
        args.extend(["--set".into(), s.clone()]);
    }
    let first = dmd(&args, &tmp);
    assert!(first.status.success(), "{}", text(&first));
    for f in ["metrics.json", "README.md", "config.toml", "samples.png", "loss_teacher.png", "loss_distill.png"] {
        assert!(results.join(f).exists(), "results/{f} missing");
    }
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(results.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["generator"]["nfe"], 1);
    assert_eq!(m["teacher"]["nfe"], 35);
    assert_eq!(m["generator"]["num_samples"], 64);
    assert!(m["generator"]["toy"]["energy_distance"].is_number());
    assert!(m["speedup"].as_f64().unwrap() > 1.0, "one step must be faster than 35 NFE");
    assert!(std::fs::read_to_string(results.join("README.md")).unwrap().contains("eight_gaussians_dmd.toml"));

    // A rerun finds every stage done and keeps the evaluation.
    let again = dmd(&args, &tmp);
    let out = text(&again);
    assert!(again.status.success(), "{out}");
    assert!(out.contains("teacher: ") && out.contains("(done earlier)"), "{out}");
    assert!(out.contains("eval: done earlier"), "{out}");
    assert!(!out.contains("distilling"), "the finished distillation ran again: {out}");
    let m2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(results.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["finished_at_unix"], m2["finished_at_unix"], "the evaluation ran again");
    assert_eq!(m["stages"]["distill"]["seconds"], m2["stages"]["distill"]["seconds"], "the stage time of the run that made it");

    // A setting that changes the trained weights is refused, naming the run folder; so is a
    // shorter run than the finished one.
    for extra in ["distill.loss.regression_weight=3.0", "distill.train.total_steps=4"] {
        let mut a = args.clone();
        a.extend(["--set".into(), extra.into()]);
        let o = dmd(&a, &tmp);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{extra} reused the finished run: {}", text(&o));
        assert!(err.contains("runs/toy/distill"), "{extra}: {err}");
    }

    // A retrained teacher (its file changed) is not silently paired with the old pairs.
    let teacher = tmp.join("teacher/teacher.safetensors");
    let mut bytes = std::fs::read(&teacher).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&teacher, bytes).unwrap();
    let o = dmd(&args, &tmp);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("different teacher"), "{}", text(&o));

    // `dmd ablate` over a set file: one table with both generators and one teacher row.
    let set_file = tmp.join("pair.toml");
    let no_dm = configs_dir().join("toy/eight_gaussians_no_dm.toml");
    std::fs::write(&set_file, format!("name = \"pair\"\ntitle = \"two\"\nexperiments = [\"{}\", \"{}\"]\n", config.display(), no_dm.display())).unwrap();
    let mut args = vec!["ablate".to_string(), set_file.display().to_string()];
    args.extend(["--set".into(), format!("teacher.train.out_dir=\"{}\"", tmp.join("teacher2").display())]);
    for s in set.iter().filter(|s| !s.starts_with("work_dir") && !s.starts_with("results_dir") && !s.starts_with("teacher.train.out_dir")) {
        args.extend(["--set".into(), s.clone()]);
    }
    let o = dmd(&args, &tmp);
    assert!(o.status.success(), "{}", text(&o));
    let readme = std::fs::read_to_string(tmp.join("results/pair/README.md")).unwrap();
    assert_eq!(readme.matches("| teacher (Heun) |").count(), 1, "{readme}");
    assert!(readme.contains("DMD: DM + L2 regression") && readme.contains("regression only (no DM)"), "{readme}");
    assert!(readme.contains("ablate ") && readme.contains("pair.toml"), "{readme}");
    let one = std::fs::read_to_string(tmp.join("results/pair/toy-8gaussians-no-dm/README.md")).unwrap();
    assert!(one.contains("results_dir=") && one.contains("eight_gaussians_no_dm.toml"), "the rerun command must write to the same folder: {one}");
}

/// The paper-scale configs carry the papers' hyperparameters (as the issue lists them), and
/// each ablation differs from its base only where it says.
#[test]
fn paper_configs_hold_the_papers_settings() {
    use dmd_experiments::experiment::ExperimentConfig;
    let load = |f: &str| ExperimentConfig::load(&configs_dir().join(f), &[]).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    let d = |f: &str| load(f).distill_config().unwrap();

    let dmd = load("imagenet64/dmd.toml");
    let p = dmd.pairs.as_ref().unwrap();
    assert_eq!((p.num, p.steps), (25_000, 256));
    let c = d("imagenet64/dmd.toml");
    assert_eq!((c.train.batch_size, c.train.total_steps, c.train.generator_lr, c.train.fake_lr, c.train.grad_clip), (336, 350_000, 2e-6, 2e-6, 10.0));
    assert_eq!((c.loss.regression_weight, c.loss.dm_weight, c.train.weight_decay), (0.25, 1.0, 0.01));
    assert_eq!(format!("{:?}", c.loss.regression), "Lpips");

    let c2 = d("imagenet64/dmd2.toml");
    assert_eq!((c2.train.batch_size, c2.train.fake_updates_per_generator_update, c2.train.generator_lr), (280, 5, 2e-6));
    assert_eq!((c2.loss.gan_generator_weight, c2.loss.gan_discriminator_weight, format!("{:?}", c2.loss.regression)), (3e-3, 1e-2, "None".to_string()));
    assert!(load("imagenet64/dmd2.toml").pairs.is_none());
    let s2 = d("imagenet64/dmd2_stage2.toml");
    assert_eq!((s2.train.generator_lr, s2.train.fake_lr), (5e-7, 5e-7));
    assert!(s2.init_from.is_some());

    for (f, pairs, weight) in [("cifar10/dmd_cond.toml", 100_000, 0.25), ("cifar10/dmd_uncond.toml", 500_000, 0.5)] {
        let e = load(f);
        let p = e.pairs.as_ref().unwrap();
        assert_eq!((p.num, p.steps), (pairs, 18), "{f}");
        let c = e.distill_config().unwrap();
        assert_eq!((c.train.generator_lr, c.train.batch_size, c.loss.regression_weight), (5e-5, 392, weight), "{f}");
    }

    // Ablations: undo the one change, and the distillation config equals the base's.
    let same_as = |ablation: &str, base: &str, undo: &dyn Fn(&mut dmd_experiments::distill::DistillConfig)| {
        let mut a = d(ablation);
        undo(&mut a);
        let mut b = d(base);
        a.out_dir = Default::default();
        b.out_dir = Default::default();
        assert_eq!(a, b, "{ablation} differs from {base} beyond its ablation");
    };
    same_as("imagenet64/dmd_no_dm.toml", "imagenet64/dmd.toml", &|c| c.loss.dm_weight = 1.0);
    same_as("imagenet64/dmd_no_regression.toml", "imagenet64/dmd.toml", &|c| c.loss.regression_weight = 0.25);
    same_as("imagenet64/dmd_weight_sigma.toml", "imagenet64/dmd.toml", &|c| c.loss.dm_weighting = Default::default());
    same_as("imagenet64/dmd_weight_sigma_cubed.toml", "imagenet64/dmd.toml", &|c| c.loss.dm_weighting = Default::default());
    same_as("imagenet64/dmd2_no_gan.toml", "imagenet64/dmd2.toml", &|c| {
        c.loss.gan_generator_weight = 3e-3;
        c.loss.gan_discriminator_weight = 1e-2;
    });
    same_as("imagenet64/dmd2_no_ttur.toml", "imagenet64/dmd2.toml", &|c| c.train.fake_updates_per_generator_update = 5);
    same_as("imagenet64/dmd2_no_dm.toml", "imagenet64/dmd2.toml", &|c| c.loss.dm_weight = 1.0);
    same_as("fashion_mnist/no_dm.toml", "fashion_mnist/dmd.toml", &|c| c.loss.dm_weight = 1.0);
    same_as("fashion_mnist/no_regression.toml", "fashion_mnist/dmd.toml", &|c| c.loss.regression_weight = 0.25);
    same_as("toy/eight_gaussians_no_dm.toml", "toy/eight_gaussians_dmd.toml", &|c| c.loss.dm_weight = 1.0);
    same_as("toy/eight_gaussians_no_regression.toml", "toy/eight_gaussians_dmd.toml", &|c| c.loss.regression_weight = 2.0);
}

#[test]
fn bad_experiment_configs_give_one_line_errors() {
    let tmp = scratch("experiment_bad");
    let config = configs_dir().join("toy/eight_gaussians_dmd.toml");
    let run = |extra: &[&str]| {
        let mut args = vec!["run".to_string(), config.display().to_string(), "--until".into(), "teacher".into()];
        args.extend(["--set".into(), format!("work_dir=\"{}\"", tmp.join("w").display())]);
        for e in extra {
            args.extend(["--set".into(), e.to_string()]);
        }
        let o = dmd(&args, &tmp);
        assert!(!o.status.success(), "{extra:?} was accepted");
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    assert!(run(&["distill.loss.bogus=1"]).contains("bogus"));
    assert!(run(&["distill.loss.dm_weighting=\"sigma_squared\""]).contains("sigma_squared"));
    assert!(run(&["pairs.num=0"]).contains("pairs"));
    assert!(run(&["distill.out_dir=\"x\""]).contains("distill.out_dir"));
    assert!(run(&["teacher.weights=\"t.safetensors\""]).contains("not both"));
}

#[test]
fn ablation_sets_name_existing_experiments() {
    let dir = configs_dir().join("ablations");
    let mut sets = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let set: toml::Table = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let list = set["experiments"].as_array().unwrap_or_else(|| panic!("{}: no experiments", p.display()));
        assert!(!list.is_empty(), "{}", p.display());
        for x in list {
            let config = dir.join(x.as_str().unwrap());
            dmd_experiments::experiment::ExperimentConfig::load(&config, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", config.display()));
        }
        sets += 1;
    }
    assert!(sets >= 6, "found {sets} ablation sets");
}
