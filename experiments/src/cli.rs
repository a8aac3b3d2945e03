//! The `dmd` command line.

use crate::{bench, device::Backend, distill, experiment, fid, pairs, sample, sd_distill, teacher, txt2img};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "dmd", version, about = "Distribution Matching Distillation of EDM diffusion models, on Burn")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an experiment end to end from its config: teacher, pairs, distillation, evaluation
    /// (finished stages are skipped, interrupted ones resume); writes results/<name>/.
    Run(experiment::RunExperimentArgs),
    /// Run several experiments (an ablation set file, or configs) and write one comparison table.
    Ablate(experiment::AblateArgs),
    /// Sample images from a network with EDM's Heun/Euler/stochastic sampler.
    Sample(sample::SampleArgs),
    /// Train an EDM teacher from a TOML config (resumes from the run's checkpoint).
    TrainTeacher(RunArgs),
    /// Write the teacher's deterministic ODE outputs for seeded noise (DMD's paired data).
    MakePairs(pairs::MakePairsArgs),
    /// Distil a teacher into a one-step generator (DMD / DMD2) from a TOML config (an EDM
    /// teacher, or Stable Diffusion when the config has an `[sd]` section).
    Distill(RunArgs),
    /// Images from prompts with a Stable Diffusion teacher (PNDM/DDIM, guidance) or a one-step
    /// generator from `dmd distill`.
    Txt2img(txt2img::Txt2ImgArgs),
    /// Evaluate a network trained on a built-in 2-D toy distribution (energy distance, modes).
    EvalToy(teacher::EvalToyArgs),
    /// A grid of samples, one row per class.
    Grid(sample::GridArgs),
    /// Fréchet Inception Distance as EDM's fid.py computes it: `ref`, `calc`, `distance`.
    #[command(subcommand)]
    Fid(fid::FidCommand),
    /// Print speed benchmarks (denoiser images/s, training step time) per CPU backend.
    Bench(bench::BenchArgs),
}

/// A training run from a config file, with the overrides a user needs without editing it.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Override the config's device.
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
    /// Override the config's output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override the config's number of training steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Override the config's `train.devices` (data-parallel replicas, one per device).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Continue a run folder whose recorded config differs from this one (the differing
    /// fields are printed); without it such a resume is refused.
    #[arg(long)]
    pub force_resume: bool,
}

impl RunArgs {
    fn apply(&self, device: &mut Backend, out_dir: &mut PathBuf, total_steps: &mut usize, devices: &mut usize) {
        *device = self.device.unwrap_or(*device);
        *out_dir = self.out.clone().unwrap_or(out_dir.clone());
        *total_steps = self.steps.unwrap_or(*total_steps);
        *devices = self.devices.unwrap_or(*devices);
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => experiment::run_cmd(&args),
        Command::Ablate(args) => experiment::ablate(&args),
        Command::Sample(args) => sample::run(&args),
        Command::TrainTeacher(a) => {
            let mut cfg = teacher::TeacherConfig::from_file(&a.config)?;
            a.apply(&mut cfg.device, &mut cfg.out_dir, &mut cfg.train.total_steps, &mut cfg.train.devices);
            cfg.validate().with_context(|| a.config.display().to_string())?;
            teacher::train(&cfg, true, a.force_resume).map(|_| ())
        }
        Command::MakePairs(args) => pairs::run(&args),
        Command::Distill(a) if sd_distill::is_text_config(&a.config) => {
            let mut cfg = sd_distill::TextDistillConfig::from_file(&a.config)?;
            let (mut steps, mut devices) = (cfg.train.total_steps, cfg.train.devices);
            a.apply(&mut cfg.device, &mut cfg.out_dir, &mut steps, &mut devices);
            (cfg.train.total_steps, cfg.train.devices) = (steps, devices);
            cfg.validate().with_context(|| a.config.display().to_string())?;
            sd_distill::distill(&cfg, true, a.force_resume).map(|_| ())
        }
        Command::Txt2img(args) => txt2img::run(&args),
        Command::Distill(a) => {
            let mut cfg = distill::DistillConfig::from_file(&a.config)?;
            a.apply(&mut cfg.device, &mut cfg.out_dir, &mut cfg.train.total_steps, &mut cfg.train.devices);
            cfg.validate().with_context(|| a.config.display().to_string())?;
            distill::distill(&cfg, true, a.force_resume).map(|_| ())
        }
        Command::EvalToy(args) => teacher::eval_toy_cmd(&args),
        Command::Grid(args) => sample::grid(&args),
        Command::Fid(cmd) => fid::run(&cmd),
        Command::Bench(args) => bench::run(&args),
    }
}

/// Runs `job` on one of the global rayon pool's threads (given main's stack size and more),
/// where there are two or more. The CPU kernels are rayon parallel loops, a few hundred per
/// training step: called from the main thread, each is handed to the pool and main sleeps
/// until it is done, two thread wake-ups per kernel and a third thread contending for the
/// cores; called from a pool thread, that thread works on the loop itself (measured in
/// results/bench/README.md). With one pool thread it
/// would deadlock the CPU replicas (`parallel.rs`), whose main replica waits for the others'
/// parallel loops: there `job` runs on the main thread.
fn on_worker_thread<R: Send>(job: impl FnOnce() -> R + Send) -> R {
    let _ = rayon::ThreadPoolBuilder::new().stack_size(32 << 20).build_global();
    if rayon::current_num_threads() < 2 {
        return job();
    }
    rayon::scope(|_| job())
}

/// Entry point of the `dmd` binary: errors are one line on stderr and a non-zero exit, never
/// a backtrace.
pub fn main() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {}", msg.lines().next().unwrap_or(""));
    }));
    let cli = Cli::parse();
    if let Err(e) = on_worker_thread(|| run(cli)) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
