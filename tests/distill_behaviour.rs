//! DMD's behaviour on a 2-D Gaussian mixture whose exact denoiser is the real score: a short,
//! deterministic distillation must move the one-step generator toward the data (energy
//! distance and samples near the modes), while the same run with the distribution-matching
//! loss switched off leaves it where it started (the one-step teacher's blob).

mod common;

use common::*;
use dmd_datasets::{ToyDistribution, ToyKind};
use dmd_experiments::distill::{distill, generator_samples, DistillConfig};
use dmd_experiments::teacher::{toy_eval_of, train, TeacherConfig};
use dmd_models::EdmPrecond;

#[test]
fn distribution_matching_moves_the_generator_toward_the_data() {
    let tmp = scratch("distill_behaviour");
    let teacher_cfg: TeacherConfig = toml::from_str(&format!(
        r#"
out_dir = "{}"
[data]
kind = "toy"
name = "eight_gaussians"
[network]
model_type = "ToyMLP"
hidden_dim = 64
num_layers = 3
[train]
batch_size = 256
total_steps = 300
lr = 4e-3
lr_rampup_kimg = 6.4
ema_halflife_kimg = 6.4
sample_every = 0
checkpoint_every = 300
[eval]
num_samples = 200
"#,
        tmp.join("teacher").display()
    ))
    .unwrap();
    let teacher = train(&teacher_cfg, false, false).unwrap().teacher;

    let dist = ToyDistribution::new(ToyKind::EightGaussians);
    let device = burn::tensor::Device::flex();
    let eval = |net: &EdmPrecond| {
        let x = generator_samples(net, &device, 1000, 77, &[80.0]);
        toy_eval_of(&x.data, &dist, 77, 1)
    };
    let start = eval(&EdmPrecond::load(&teacher, &teacher.with_extension("json"), &device, "t").unwrap());
    eprintln!("one-step teacher: {}", start.summary());

    let run = |name: &str, dm_weight: f64| {
        let cfg: DistillConfig = toml::from_str(&format!(
            r#"
out_dir = "{}"
[teacher]
weights = "{}"
exact_real_score = "eight_gaussians"
[loss]
dm_weight = {dm_weight}
[train]
batch_size = 128
total_steps = 1000
generator_lr = 2e-4
fake_lr = 2e-4
fake_updates_per_generator_update = 2
log_every = 100
checkpoint_every = 1000
"#,
            tmp.join(name).display(),
            teacher.display()
        ))
        .unwrap();
        let out = distill(&cfg, false, false).unwrap();
        let e = eval(&EdmPrecond::load(&out.generator, &out.generator.with_extension("json"), &device, "g").unwrap());
        eprintln!("{name}: {}", e.summary());
        e
    };
    let with_dm = run("with_dm", 1.0);
    let without_dm = run("without_dm", 0.0);

    let near = |e: &dmd_experiments::teacher::ToyEval| e.modes.as_ref().unwrap().frac_near_mode;
    // The one-step teacher is the posterior mean at sigma 80: a blob far from every mode.
    assert!(start.energy_distance > 0.2 && near(&start) < 0.01, "{}", start.summary());
    assert!(with_dm.energy_distance < 0.5 * start.energy_distance, "DM must close the distance: {}", with_dm.summary());
    assert!(near(&with_dm) > 0.1, "DM must put samples on the modes: {}", with_dm.summary());
    assert!((without_dm.energy_distance - start.energy_distance).abs() < 0.05 * start.energy_distance, "{}", without_dm.summary());
    assert!(near(&without_dm) < 0.01, "{}", without_dm.summary());
}
