//! Runs that survive `kill -9`, on the ndarray backend: teacher training, pair generation and
//! distillation are each run twice straight through (same seed and config: the bits must agree
//! run to run) and once killed with SIGKILL at random moments and restarted until it finishes
//! (the resumed run must end with exactly the same bits: weights and EMA; every update after a
//! resume goes through the restored Adam moments, so they are checked through the weights: the
//! optimiser files themselves store a hash map whose byte order varies from run to run).
//!
//! The kill moments are random; the seed is printed and `DMD_KILL_SEED` repeats a run.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `dmd args` to the end.
fn run_ok(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap();
    assert!(o.status.success(), "dmd {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Starts `dmd args` and kills it with SIGKILL once `progress()` reaches `target`, after a
/// further random pause of up to `jitter_ms` (so that the kill may land in any part of a step or
/// of a checkpoint write); false when the run had finished first.
fn kill_at(args: &[&str], progress: &dyn Fn() -> u64, target: u64, jitter_ms: u64, rng: &mut StdRng) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    while progress() < target {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_micros(rng.random_range(0..jitter_ms * 1000)));
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    true
}

/// Kills `args` twice, at random points of its progress (`progress()` counts up to `total`),
/// then lets it finish.
fn kill_twice_then_finish(args: &[&str], progress: &dyn Fn() -> u64, total: u64, rng: &mut StdRng) {
    let first = rng.random_range(total / 10..total / 2);
    assert!(kill_at(args, progress, first, 30, rng), "the run finished before the kill at {first} of {total}");
    let second = rng.random_range(first + 1..total * 9 / 10);
    let again = kill_at(args, progress, second, 30, rng);
    eprintln!("{}: killed at {first} of {total}, then {} {second}", args[0], if again { "again at" } else { "finished before" });
    run_ok(args);
}

/// The last step in a run's metrics log (0 when none).
fn last_logged(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .ok()
        .and_then(|t| t.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max())
        .unwrap_or(0)
}

/// Finished pair shards in a folder.
fn shards(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "safetensors")).count() as u64).unwrap_or(0)
}

fn same_tensors(a: &Path, b: &Path, what: &str) {
    assert_eq!(read(a).tensors, read(b).tensors, "{what}: {} and {} differ", a.display(), b.display());
}

fn logged_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

/// The run folder after the job: no temporary left, at most `keep - 1` older checkpoints.
fn tidy(dir: &Path, keep: usize) {
    assert!(!dir.join("checkpoint.tmp").exists(), "{}: checkpoint.tmp left behind", dir.display());
    let history = std::fs::read_dir(dir.join("checkpoint.history")).map(|d| d.count()).unwrap_or(0);
    assert!(history < keep, "{}: {history} old checkpoints kept, keep_checkpoints = {keep}", dir.display());
}

fn rng() -> StdRng {
    let seed = std::env::var("DMD_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("kill moments from DMD_KILL_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn teacher_config(out: &Path) -> String {
    format!(
        "out_dir = \"{}\"\ndevice = \"ndarray\"\n[data]\nkind = \"toy\"\nname = \"eight_gaussians\"\n[network]\nmodel_type = \"ToyMLP\"\nhidden_dim = 32\nnum_layers = 2\n\
         [train]\nbatch_size = 64\ntotal_steps = 1000\nlr = 4e-3\nlr_rampup_kimg = 20\nema_halflife_kimg = 10\nlog_every = 10\ncheckpoint_every = 10\nsample_every = 0\nkeep_checkpoints = 3\n\
         [eval]\nnum_samples = 100\n",
        s(out)
    )
}

fn distill_config(out: &Path, teacher: &Path, pairs: &Path) -> String {
    format!(
        "out_dir = \"{}\"\ndevice = \"ndarray\"\npairs = \"{}\"\n[teacher]\nweights = \"{}\"\n[loss]\nregression = \"l2\"\n\
         [train]\nbatch_size = 64\nregression_batch_size = 32\ntotal_steps = 600\ngenerator_lr = 1e-3\nfake_lr = 1e-3\nfake_updates_per_generator_update = 2\n\
         ema_decay = 0.99\nwarmup_steps = 100\nlog_every = 10\ncheckpoint_every = 10\nsample_every = 0\nkeep_checkpoints = 2\n[eval]\ntoy = \"eight_gaussians\"\nnum_samples = 100\n",
        s(out),
        s(pairs),
        s(teacher)
    )
}

#[test]
fn killed_runs_resume_bit_exactly_and_runs_repeat() {
    let tmp = scratch("kill_resume");
    let mut rng = rng();
    let dirs = |name: &str| -> [PathBuf; 3] { ["a", "b", "killed"].map(|k| tmp.join(format!("{name}_{k}"))) };

    // 1. Teacher training.
    let teacher = dirs("teacher");
    for dir in &teacher {
        let cfg = dir.with_extension("toml");
        std::fs::write(&cfg, teacher_config(dir)).unwrap();
        let args = ["train-teacher", "--config", s(&cfg)];
        if dir.ends_with("teacher_killed") {
            kill_twice_then_finish(&args, &|| last_logged(dir), 1000, &mut rng);
        } else {
            run_ok(&args);
        }
    }
    for dir in &teacher[1..] {
        for f in ["checkpoint/net.safetensors", "checkpoint/ema.safetensors", "teacher.safetensors"] {
            same_tensors(&teacher[0].join(f), &dir.join(f), "teacher");
        }
        assert_eq!(logged_steps(dir), (1..=100).map(|k| k * 10).collect::<Vec<_>>(), "{}: metrics log", dir.display());
        tidy(dir, 3);
    }
    let teacher_weights = teacher[0].join("teacher.safetensors");

    // 2. Pairs: shards written whole or not at all; a restart finishes the missing ones.
    let pairs = dirs("pairs");
    for dir in &pairs {
        let args = ["make-pairs", "--teacher", s(&teacher_weights), "--num", "6000", "--steps", "64", "--shard-size", "200", "--batch", "100", "--device", "ndarray", "--out", s(dir)];
        if dir.ends_with("pairs_killed") {
            kill_twice_then_finish(&args, &|| shards(dir), 30, &mut rng);
        } else {
            run_ok(&args);
        }
    }
    for dir in &pairs[1..] {
        for k in 0..30 {
            let f = format!("pairs-{k:06}.safetensors");
            same_tensors(&pairs[0].join(&f), &dir.join(&f), "pairs");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "tmp")).collect();
        assert!(leftovers.is_empty(), "{}: temporary files left: {leftovers:?}", dir.display());
    }

    // 3. Distillation (DMD with regression on the pairs, TTUR, EMA, warm-up).
    let distill = dirs("distill");
    for dir in &distill {
        let cfg = dir.with_extension("toml");
        std::fs::write(&cfg, distill_config(dir, &teacher_weights, &pairs[0])).unwrap();
        let args = ["distill", "--config", s(&cfg)];
        if dir.ends_with("distill_killed") {
            kill_twice_then_finish(&args, &|| last_logged(dir), 600, &mut rng);
        } else {
            run_ok(&args);
        }
    }
    for dir in &distill[1..] {
        for f in ["checkpoint/generator.safetensors", "checkpoint/fake.safetensors", "checkpoint/generator_ema.safetensors", "generator.safetensors"] {
            same_tensors(&distill[0].join(f), &dir.join(f), "distill");
        }
        assert_eq!(logged_steps(dir), (1..=60).map(|k| k * 10).collect::<Vec<_>>(), "{}: metrics log", dir.display());
        tidy(dir, 2);
    }
}

fn checkpoint_step(run: &Path) -> u64 {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap()).unwrap();
    state["step"].as_u64().unwrap()
}

fn dmd_err(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap();
    assert!(!o.status.success(), "dmd {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn a_changed_config_is_refused_naming_the_fields_unless_forced() {
    let tmp = scratch("resume_config_guard");
    let run = tmp.join("run");
    let cfg = tmp.join("a.toml");
    std::fs::write(&cfg, teacher_config(&run)).unwrap();
    run_ok(&["train-teacher", "--config", s(&cfg), "--steps", "20"]);
    let changed = tmp.join("b.toml");
    std::fs::write(&changed, teacher_config(&run).replace("lr = 4e-3", "lr = 2e-3").replace("num_layers = 2", "num_layers = 3")).unwrap();
    let err = dmd_err(&["train-teacher", "--config", s(&changed), "--steps", "30"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in ["config.toml", "train.lr: 0.004 -> 0.002", "network.num_layers: 2 -> 3", "--force-resume"] {
        assert!(err.contains(needle), "should name `{needle}`: {err}");
    }
    assert_eq!(checkpoint_step(&run), 20, "the refused run must not touch the checkpoint");
    // Forced: the run continues from step 20 with the new learning rate.
    std::fs::write(&changed, teacher_config(&run).replace("lr = 4e-3", "lr = 2e-3")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(["train-teacher", "--config", s(&changed), "--steps", "30", "--force-resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming") && err.contains("from step 20") && err.contains("train.lr"), "{err}");
    assert!(std::fs::read_to_string(run.join("checkpoint/config.toml")).unwrap().contains("lr = 0.002"));
}

#[test]
fn non_finite_steps_are_skipped_and_a_streak_stops_the_run() {
    let tmp = scratch("nonfinite_guard");
    // An absurd learning rate: the first real update (step 1; the ramp gives 0 at step 0)
    // sends the weights to ~1e30, and every later loss overflows.
    let run = tmp.join("run");
    let cfg = tmp.join("nan.toml");
    let text = teacher_config(&run)
        .replace("lr = 4e-3", "lr = 1e30")
        .replace("lr_rampup_kimg = 20", "lr_rampup_kimg = 0")
        .replace("checkpoint_every = 10", "checkpoint_every = 1\nmax_nonfinite_in_a_row = 4");
    std::fs::write(&cfg, text).unwrap();
    let err = dmd_err(&["train-teacher", "--config", s(&cfg)]);
    let last = err.lines().last().unwrap();
    let skipped = err.lines().filter(|l| l.ends_with("step skipped")).count();
    assert_eq!(skipped, 4, "{err}");
    for needle in ["error: step 5: 4 steps in a row (from step 2)", "max_nonfinite_in_a_row = 4", "last good checkpoint", "(step 2)"] {
        assert!(last.contains(needle), "should say `{needle}`: {last}");
    }
    // The checkpoint kept is the one before the streak; no final weights were written.
    assert_eq!(checkpoint_step(&run), 2);
    assert!(!run.join("teacher.safetensors").exists());

    // Distillation: a generator learning rate that sends the generator to ~1e30 at step 0.
    let teacher_cfg = tmp.join("teacher.toml");
    std::fs::write(&teacher_cfg, teacher_config(&tmp.join("teacher"))).unwrap();
    run_ok(&["train-teacher", "--config", s(&teacher_cfg), "--steps", "10"]);
    let distill = tmp.join("distill");
    let cfg = tmp.join("distill.toml");
    let text = distill_config(&distill, &tmp.join("teacher/teacher.safetensors"), &tmp.join("none"))
        .replace("pairs = ", "# pairs = ")
        .replace("regression = \"l2\"", "regression = \"none\"")
        .replace("generator_lr = 1e-3", "generator_lr = 1e30")
        .replace("warmup_steps = 100", "warmup_steps = 0")
        .replace("fake_updates_per_generator_update = 2", "fake_updates_per_generator_update = 1")
        .replace("checkpoint_every = 10", "checkpoint_every = 1\nmax_nonfinite_in_a_row = 3");
    std::fs::write(&cfg, text).unwrap();
    let err = dmd_err(&["distill", "--config", s(&cfg)]);
    let last = err.lines().last().unwrap();
    assert_eq!(err.lines().filter(|l| l.ends_with("update skipped")).count(), 3, "{err}");
    for needle in ["error: step 3: 3 steps in a row (from step 1)", "loss NaN", "(step 1)"] {
        assert!(last.contains(needle), "should say `{needle}`: {last}");
    }
    assert_eq!(checkpoint_step(&distill), 1);
    assert!(!distill.join("generator.safetensors").exists());
}
