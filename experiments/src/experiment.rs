//! `dmd run` and `dmd ablate`: one experiment = one TOML file that names the teacher (trained
//! here or loaded), the teacher pairs, the distillation recipe and the evaluation. Each stage
//! is skipped when its outputs exist and were made with the same settings, and resumes from its
//! checkpoint when it was interrupted. The run writes `results/<name>/`: `metrics.json`,
//! `README.md`, the resolved `config.toml`, a sample grid (teacher beside generator, same
//! seeds) and the loss curves.
//!
//! Config files may start from another (`base = "file.toml"`, merged key by key), include the
//! teacher's training config by path (`[teacher] train = "file.toml"`), and be changed from the
//! command line (`--set distill.train.batch_size=2`).

use crate::checkpoint::toml_error;
use crate::device::Backend;
use crate::distill::{self, generator_sigmas_of, DistillConfig};
use crate::fid::{frechet_distance, FidMode, FidStats, StatsAccumulator};
use crate::output::{encode_png, grid_png_cols, scatter_canvas};
use crate::pairs::{self, MakePairsArgs};
use crate::sample::{concat_rows, progress, rows, ImageSource};
use crate::teacher::{self, toy_eval_of, ToyEval, TeacherConfig};
use crate::data::{DataConfig, DataSource};
use anyhow::{bail, Context, Result};
use dmd_datasets::{ToyDistribution, ToyKind};
use dmd_models::inception::{FidInception, FidPreprocess};
use dmd_models::weights::write_atomic;
use dmd_models::HostTensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Config

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Names the results folder (`results/<name>`) and the work folder (`runs/<name>`).
    pub name: String,
    /// One line for tables and the README.
    #[serde(default)]
    pub title: String,
    /// What the paper reports for this setting, quoted in the README beside our numbers.
    #[serde(default)]
    pub paper: Option<String>,
    #[serde(default)]
    pub device: Backend,
    /// Training outputs (default `runs/<name>`); results go to `results_dir` (default `results/<name>`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    #[serde(default)]
    pub results_dir: Option<PathBuf>,
    pub teacher: TeacherStage,
    /// Teacher pairs for the regression loss (DMD); none for DMD2.
    #[serde(default)]
    pub pairs: Option<PairsStage>,
    /// A `dmd distill` config without `out_dir`, `device`, `pairs` and `teacher.weights`,
    /// which come from this file.
    pub distill: toml::Table,
    #[serde(default)]
    pub eval: EvalStage,
}

/// The teacher: trained from a `dmd train-teacher` config, or a pretrained EDM network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherStage {
    /// A `dmd train-teacher` config: a path relative to this file, or inline.
    #[serde(default)]
    pub train: Option<TeacherConfig>,
    /// EDM weights as safetensors (`tools/edm_to_safetensors.py`), config beside as `.json`.
    #[serde(default)]
    pub weights: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsStage {
    pub num: usize,
    /// Heun steps (DMD: 256 for ImageNet-64, 18 for CIFAR-10).
    #[serde(default = "eighteen")]
    pub steps: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "sixty_four")]
    pub batch: usize,
    #[serde(default = "thousand")]
    pub shard_size: usize,
    /// Default: `pairs-n<num>-heun<steps>-seed<seed>` beside the teacher's weights, so that
    /// experiments sharing a teacher share its pairs.
    #[serde(default)]
    pub out: Option<PathBuf>,
}

fn eighteen() -> usize {
    18
}
fn sixty_four() -> usize {
    64
}
fn thousand() -> usize {
    1000
}

/// How the generator is compared with its teacher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalStage {
    /// Samples per model (FID-N; the papers use 50000).
    pub num_samples: usize,
    /// Sample i uses seed `seed + i`, for the teacher and the generator alike.
    pub seed: u64,
    /// Heun steps of the teacher's reference row (18 -> 35 NFE); 0: no teacher row.
    pub teacher_steps: usize,
    /// Images (or points) per network call.
    pub batch: usize,
    /// Seeds in the sample grid.
    pub grid_seeds: usize,
    /// 2-D toys: energy distance and mode statistics against fresh data.
    pub toy: Option<ToyKind>,
    /// Images: FID.
    pub fid: Option<FidEval>,
}

impl Default for EvalStage {
    fn default() -> Self {
        Self { num_samples: 50_000, seed: 1_000_000, teacher_steps: 18, batch: 64, grid_seeds: 32, toy: None, fid: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidEval {
    /// FID Inception weights (`tools/inception_to_safetensors.py`; NVIDIA's by default).
    pub inception: PathBuf,
    #[serde(default = "nvidia")]
    pub mode: FidMode,
    /// Reference statistics (`.npz`, EDM's format). When the file does not exist it is
    /// computed from `reference_data` (default: the teacher's training data) and written there.
    pub reference: PathBuf,
    #[serde(default)]
    pub reference_data: Option<DataConfig>,
    /// Images of `reference_data` in the statistics (drawn with a fixed seed).
    #[serde(default = "ten_thousand")]
    pub reference_num: usize,
}

fn nvidia() -> FidMode {
    FidMode::Nvidia
}
fn ten_thousand() -> usize {
    10_000
}

/// Reads an experiment config as a TOML table: `base` files merged underneath, `teacher.train`
/// read when it is a path, then the `--set key.path=value` overrides applied.
pub fn load_table(path: &Path, overrides: &[String]) -> Result<toml::Table> {
    let mut table = read_with_base(path, 0)?;
    if !table.contains_key("name") {
        let stem = path.file_stem().map(|s| s.to_string_lossy().replace('_', "-")).unwrap_or_default();
        table.insert("name".into(), toml::Value::String(stem));
    }
    for o in overrides {
        set_override(&mut table, o)?;
    }
    // `--set teacher.train=FILE` names a file relative to the current folder.
    inline_teacher_config(&mut table, Path::new("."))?;
    Ok(table)
}

/// Replaces `[teacher] train = "FILE"` by the file's table (FILE relative to `dir`).
fn inline_teacher_config(table: &mut toml::Table, dir: &Path) -> Result<()> {
    if let Some(toml::Value::Table(t)) = table.get_mut("teacher") {
        if let Some(toml::Value::String(p)) = t.get("train").cloned() {
            t.insert("train".into(), toml::Value::Table(read_table(&dir.join(&p))?));
        }
    }
    Ok(())
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), toml_error(&text, &e, true)))
}

/// Deserialises a merged table through its TOML text, so that an error names the key at fault.
fn from_merged<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T> {
    let text = toml::to_string(&table)?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}", toml_error(&text, &e, false)))
}

fn read_with_base(path: &Path, depth: usize) -> Result<toml::Table> {
    if depth > 8 {
        bail!("{}: `base` nests more than 8 deep (a cycle?)", path.display());
    }
    let mut table = read_table(path)?;
    // A teacher config file is read relative to the file that names it, before merging, so
    // that a derived file can change single keys of it.
    inline_teacher_config(&mut table, path.parent().unwrap_or(Path::new(".")))?;
    match table.remove("base") {
        None => Ok(table),
        Some(toml::Value::String(b)) => {
            let base_path = path.parent().unwrap_or(Path::new(".")).join(&b);
            let mut base = read_with_base(&base_path, depth + 1).with_context(|| format!("{}: base", path.display()))?;
            // A derived file names itself and its folders; it never inherits them.
            for key in ["name", "title", "paper", "work_dir", "results_dir"] {
                base.remove(key);
            }
            merge(&mut base, table);
            Ok(base)
        }
        Some(v) => bail!("{}: `base` must be a file name, got {v}", path.display()),
    }
}

/// Merges `over` into `base`: tables key by key, everything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Applies `a.b.c=value` (value in TOML syntax; a bare word is a string).
pub fn set_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec.split_once('=').with_context(|| format!("--set {spec}: expected KEY=VALUE, e.g. distill.train.batch_size=2"))?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    // Config keys nest a few levels; thousands would be a table nested as deep, which the
    // deserialiser and drop walk recursively (a stack overflow).
    if parts.len() > 16 {
        bail!("--set {key}: more than 16 levels of keys");
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            other => bail!("--set {spec}: `{p}` is {other}, not a table"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl ExperimentConfig {
    pub fn from_table(table: toml::Table, what: &str) -> Result<Self> {
        let cfg: Self = from_merged(table).with_context(|| what.to_string())?;
        cfg.validate().with_context(|| what.to_string())?;
        Ok(cfg)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::from_table(load_table(path, overrides)?, &path.display().to_string())
    }

    fn validate(&self) -> Result<()> {
        match (&self.teacher.train, &self.teacher.weights) {
            (Some(_), Some(_)) => bail!("teacher: give `train` or `weights`, not both"),
            (None, None) => bail!("teacher: give `train` (a dmd train-teacher config) or `weights` (an EDM network)"),
            _ => {}
        }
        if let Some(t) = &self.teacher.train {
            t.validate().context("teacher.train")?;
        }
        if self.eval.toy.is_some() && self.eval.fid.is_some() {
            bail!("eval: give `toy` or `fid`, not both");
        }
        if self.eval.num_samples == 0 || self.eval.batch == 0 {
            bail!("eval: num_samples and batch must be positive");
        }
        if let Some(p) = &self.pairs {
            if p.num == 0 || p.steps == 0 || p.batch == 0 || p.shard_size == 0 {
                bail!("pairs: num, steps, batch and shard_size must be positive");
            }
        }
        for key in ["out_dir", "device", "pairs"] {
            if self.distill.contains_key(key) {
                bail!("distill.{key}: set by the experiment (work_dir, device, [pairs]); remove it");
            }
        }
        self.distill_config()?;
        Ok(())
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    pub fn results_dir(&self) -> PathBuf {
        self.results_dir.clone().unwrap_or_else(|| PathBuf::from("results").join(&self.name))
    }

    pub fn teacher_weights(&self) -> PathBuf {
        match (&self.teacher.train, &self.teacher.weights) {
            (Some(t), _) => teacher::RunDir(t.out_dir.clone()).teacher(),
            (None, Some(w)) => w.clone(),
            (None, None) => unreachable!("validated"),
        }
    }

    pub fn pairs_dir(&self) -> Option<PathBuf> {
        self.pairs.as_ref().map(|p| {
            p.out.clone().unwrap_or_else(|| {
                let w = self.teacher_weights();
                w.parent().unwrap_or(Path::new(".")).join(format!("pairs-n{}-heun{}-seed{}", p.num, p.steps, p.seed))
            })
        })
    }

    /// The distillation config with the experiment's paths and device filled in.
    pub fn distill_config(&self) -> Result<DistillConfig> {
        let mut t = self.distill.clone();
        t.insert("out_dir".into(), toml::Value::String(self.work_dir().join("distill").display().to_string()));
        t.insert("device".into(), toml::Value::String(self.device.to_string()));
        if let Some(p) = self.pairs_dir() {
            t.insert("pairs".into(), toml::Value::String(p.display().to_string()));
        }
        let teacher = t.entry("teacher").or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(tt) = teacher {
            tt.entry("weights").or_insert_with(|| toml::Value::String(self.teacher_weights().display().to_string()));
        }
        let cfg: DistillConfig = from_merged(t).context("distill")?;
        cfg.validate().context("distill")?;
        Ok(cfg)
    }

    fn teacher_config(&self) -> Option<TeacherConfig> {
        self.teacher.train.clone().map(|mut t| {
            t.device = self.device;
            t
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Running

#[derive(clap::Args, Debug, Clone)]
pub struct RunExperimentArgs {
    /// Experiment config (TOML; see experiments/configs/README.md).
    pub config: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl CommonArgs {
    /// The `--set` overrides, with `--device` as one more (so that it enters the recorded
    /// config and its hash).
    pub fn overrides(&self) -> Vec<String> {
        let mut set = self.set.clone();
        if let Some(d) = self.device {
            set.push(format!("device=\"{d}\""));
        }
        set
    }
}

/// What `dmd run` and `dmd ablate` share.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Change a config value: `--set distill.train.total_steps=100` (TOML syntax; repeatable;
    /// `dmd ablate` applies it to every experiment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Override the config's device.
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
    /// Stop after this stage (the later stages are not run).
    #[arg(long, value_enum, default_value = "eval")]
    pub until: Stage,
    /// Continue interrupted stages whose recorded config differs from the new one (the
    /// differing fields are printed); without it they are refused.
    #[arg(long)]
    pub force_resume: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// FID reference statistics of the data (when missing), before anything is trained.
    Reference,
    Teacher,
    Pairs,
    Distill,
    Eval,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AblateArgs {
    /// An ablation set (TOML with `name`, `title`, `experiments = [...]`) or experiment configs.
    #[arg(required = true)]
    pub configs: Vec<PathBuf>,
    /// Name of the comparison (results/<name>/); default: the set's `name`.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One model's row of the results table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRow {
    pub model: String,
    /// Network evaluations per sample.
    pub nfe: usize,
    pub num_samples: usize,
    pub fid: Option<f64>,
    pub toy: Option<serde_json::Value>,
    /// Generation wall time per sample (network calls only, no Inception), and its inverse.
    pub sampling_ms_per_sample: f64,
    pub samples_per_s: f64,
    pub batch: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageTime {
    /// None: done by an earlier run that did not record its time.
    pub seconds: Option<f64>,
    /// Done by an earlier invocation (the time is that of this check only).
    pub skipped: bool,
}

/// What `results/<name>/metrics.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExperimentMetrics {
    pub experiment: String,
    pub title: String,
    pub paper: Option<String>,
    pub command: String,
    pub config_hash: String,
    pub git_commit: String,
    pub backend: String,
    pub machine: String,
    pub finished_at_unix: u64,
    pub stages: std::collections::BTreeMap<String, StageTime>,
    pub teacher: Option<ModelRow>,
    pub generator: Option<ModelRow>,
    /// Teacher sampling time per sample over the generator's.
    pub speedup: Option<f64>,
}

/// FNV-1a 64 of the text, as 16 hex digits.
pub fn fnv_hex(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {threads} threads")
}

/// FNV-1a 64 of a file's bytes: tells retrained weights from the old ones (same size).
fn file_fingerprint(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| path.display().to_string())?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// Records in `dir` which teacher its outputs come from, and refuses a folder made from
/// another (the teacher was retrained or its file replaced since).
fn check_teacher_stamp(dir: &Path, teacher_fp: &str) -> Result<()> {
    let stamp = dir.join("teacher_fingerprint.txt");
    match std::fs::read_to_string(&stamp) {
        Ok(old) if old.trim() != teacher_fp => {
            bail!("{}: made from a different teacher (its weights changed since); delete this folder to redo the stage", dir.display())
        }
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            Ok(write_atomic(&stamp, teacher_fp.as_bytes())?)
        }
    }
}

/// A stage's wall time: measured now when it ran, else what the run that made it recorded.
fn stage_time(dir: &Path, ran: Option<f64>) -> Result<StageTime> {
    let file = dir.join("stage_time.json");
    Ok(match ran {
        Some(seconds) => {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            write_atomic(&file, serde_json::json!({ "seconds": seconds }).to_string().as_bytes())?;
            StageTime { seconds: Some(seconds), skipped: false }
        }
        None => {
            let seconds = std::fs::read_to_string(&file).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).and_then(|v| v["seconds"].as_f64());
            StageTime { seconds, skipped: true }
        }
    })
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// Runs an experiment's stages and writes its results folder. Returns the metrics (None when
/// stopped before the evaluation).
pub fn run(cfg: &ExperimentConfig, table: &toml::Table, command: &str, until: Stage, force_resume: bool) -> Result<Option<ExperimentMetrics>> {
    let mut stages = std::collections::BTreeMap::new();
    let results = cfg.results_dir();
    let teacher = cfg.teacher_weights();
    // Checked before anything is written (the reference statistics need no teacher).
    if cfg.teacher.train.is_none() && !teacher.exists() && until != Stage::Reference {
        bail!("teacher.weights: {} does not exist (convert EDM's pickle with tools/edm_to_safetensors.py)", teacher.display());
    }
    std::fs::create_dir_all(&results).with_context(|| results.display().to_string())?;
    let resolved = toml::to_string_pretty(table)?;
    let config_hash = fnv_hex(&resolved);
    eprintln!("== experiment {} ({}) on {}", cfg.name, cfg.title, cfg.device);

    // 0. FID reference statistics, first: they need only the data.
    if let Some(f) = cfg.eval.fid.as_ref().filter(|f| !f.reference.exists() && (until == Stage::Reference || until == Stage::Eval)) {
        let device = cfg.device.device()?;
        let net = FidInception::load(&f.inception, &device)?;
        let (_, s) = timed(|| reference_of(cfg, f, &net, &device))?;
        stages.insert("fid_reference".into(), StageTime { seconds: Some(s), skipped: false });
    }
    if until == Stage::Reference {
        return Ok(None);
    }

    // 1. Teacher.
    if let Some(tc) = cfg.teacher_config() {
        let done = teacher::finished(&tc)?;
        let (_, s) = timed(|| if done { Ok(()) } else { teacher::train(&tc, true, force_resume).map(|_| ()) })?;
        eprintln!("teacher: {} ({})", teacher.display(), if done { "done earlier" } else { "trained" });
        stages.insert("teacher".into(), stage_time(&tc.out_dir, (!done).then_some(s))?);
    }
    let teacher_fp = file_fingerprint(&teacher)?;
    if until == Stage::Teacher {
        return Ok(None);
    }

    // 2. Teacher pairs (make-pairs skips finished shards).
    if let (Some(p), Some(dir)) = (&cfg.pairs, cfg.pairs_dir()) {
        let args = MakePairsArgs {
            teacher: teacher.clone(),
            teacher_config: None,
            num: p.num,
            steps: p.steps,
            seed: p.seed,
            shard_size: p.shard_size,
            batch: p.batch,
            out: dir.clone(),
            device: cfg.device,
            shard: None,
        };
        check_teacher_stamp(&dir, &teacher_fp)?;
        let done = pairs::finished(&args);
        let (_, s) = timed(|| if done { Ok(()) } else { pairs::run(&args) })?;
        stages.insert("pairs".into(), stage_time(&dir, (!done).then_some(s))?);
    }
    if until == Stage::Pairs {
        return Ok(None);
    }

    // 3. Distillation (resumes from its checkpoint).
    let dcfg = cfg.distill_config()?;
    check_teacher_stamp(&dcfg.out_dir, &teacher_fp)?;
    let done = distill::finished(&dcfg)?;
    let (_, s) = timed(|| if done { Ok(()) } else { distill::distill(&dcfg, true, force_resume).map(|_| ()) })?;
    stages.insert("distill".into(), stage_time(&dcfg.out_dir, (!done).then_some(s))?);
    let generator = dcfg.out_dir.join("generator.safetensors");
    if until == Stage::Distill {
        return Ok(None);
    }

    // 4. Evaluation, the sample grid and the plots; kept when this config already evaluated
    // this generator.
    if done {
        let old = std::fs::read_to_string(results.join("metrics.json")).ok().and_then(|t| serde_json::from_str::<ExperimentMetrics>(&t).ok());
        if let Some(old) = old.filter(|m| m.config_hash == config_hash && m.generator.is_some()) {
            eprintln!("eval: done earlier ({})", results.join("metrics.json").display());
            return Ok(Some(old));
        }
    }
    let t0 = Instant::now();
    let device = cfg.device.device()?;
    let gen_source = ImageSource::open(Some(&generator), None, 1, &device)?;
    let gen_nfe = generator_sigmas_of(&generator, dcfg.generator.conditioning_sigma)?.len();
    let teacher_source = (cfg.eval.teacher_steps > 0).then(|| ImageSource::open(None, Some(&teacher), cfg.eval.teacher_steps, &device)).transpose()?;
    let teacher_nfe = 2 * cfg.eval.teacher_steps.max(1) - 1;
    let mut evaluator = Evaluator::new(cfg, &device)?;
    let teacher_row = match &teacher_source {
        Some(src) => Some(cached_teacher_row(cfg, &teacher, &teacher_fp, || evaluator.row(src, "teacher (Heun)", teacher_nfe))?),
        None => None,
    };
    let gen_row = evaluator.row(&gen_source, "generator", gen_nfe)?;
    stages.insert("eval".into(), StageTime { seconds: Some(t0.elapsed().as_secs_f64()), skipped: false });

    write_grid(&results.join("samples.png"), teacher_source.as_ref(), &gen_source, cfg)?;
    let mut curves = Vec::new();
    if let Some(tc) = cfg.teacher_config() {
        curves.push(("teacher", tc.out_dir.join("metrics.jsonl"), vec!["loss"]));
    }
    curves.push(("distill", dcfg.out_dir.join("metrics.jsonl"), vec!["dm_loss", "regression_loss", "gan_generator_loss", "fake_loss", "gan_discriminator_loss"]));
    for (what, path, keys) in curves {
        if path.exists() {
            let png = crate::output::loss_curves_png(&path, &keys)?;
            write_atomic(&results.join(format!("loss_{what}.png")), &png)?;
        }
    }
    let speedup = teacher_row.as_ref().map(|t| t.sampling_ms_per_sample / gen_row.sampling_ms_per_sample.max(1e-12));
    let metrics = ExperimentMetrics {
        experiment: cfg.name.clone(),
        title: cfg.title.clone(),
        paper: cfg.paper.clone(),
        command: command.to_string(),
        config_hash,
        git_commit: git_commit(),
        backend: match cfg.device {
            Backend::Cpu => "cpu (burn flex)".into(),
            b => b.to_string(),
        },
        machine: machine(),
        finished_at_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        stages,
        teacher: teacher_row,
        generator: Some(gen_row),
        speedup,
    };
    write_atomic(&results.join("config.toml"), resolved.as_bytes())?;
    write_atomic(&results.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    write_atomic(&results.join("README.md"), experiment_readme(&metrics, &results).as_bytes())?;
    eprintln!("{}", table_markdown(std::slice::from_ref(&metrics), true));
    eprintln!("results: {}", results.display());
    Ok(Some(metrics))
}

/// The teacher's row, reused from an earlier run with the same teacher and evaluation.
fn cached_teacher_row(cfg: &ExperimentConfig, teacher: &Path, teacher_fp: &str, compute: impl FnOnce() -> Result<ModelRow>) -> Result<ModelRow> {
    let mut eval = cfg.eval.clone();
    eval.grid_seeds = 0;
    let key = fnv_hex(&format!("{teacher_fp}|{}|{}", serde_json::to_string(&eval)?, cfg.device));
    let path = teacher.parent().unwrap_or(Path::new(".")).join("eval-cache").join(format!("teacher-{key}.json"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(row) = serde_json::from_str::<ModelRow>(&text) {
            eprintln!("teacher row from {}", path.display());
            return Ok(row);
        }
    }
    let row = compute()?;
    write_atomic(&path, serde_json::to_string_pretty(&row)?.as_bytes())?;
    Ok(row)
}

/// Scores sample sets: toy metrics, or FID against the reference statistics.
struct Evaluator<'a> {
    cfg: &'a ExperimentConfig,
    device: burn::tensor::Device,
    fid: Option<(FidInception, FidPreprocess, FidStats)>,
}

impl<'a> Evaluator<'a> {
    fn new(cfg: &'a ExperimentConfig, device: &burn::tensor::Device) -> Result<Self> {
        let fid = match &cfg.eval.fid {
            Some(f) => {
                let net = FidInception::load(&f.inception, device)?;
                let mode = FidPreprocess::from(f.mode);
                let reference = reference_of(cfg, f, &net, device)?;
                Some((net, mode, reference))
            }
            None => None,
        };
        Ok(Self { cfg, device: device.clone(), fid })
    }

    fn row(&mut self, source: &ImageSource, model: &str, nfe: usize) -> Result<ModelRow> {
        let e = &self.cfg.eval;
        let n = e.num_samples;
        let mut gen_seconds = 0.0;
        let bar = progress(n as u64, &format!("eval {model}"));
        let mut points = Vec::new();
        let mut acc = StatsAccumulator::new(2048);
        for start in (0..n).step_by(e.batch) {
            let m = (start + e.batch).min(n) - start;
            let seeds: Vec<u64> = (0..m as u64).map(|i| e.seed + (start as u64) + i).collect();
            let t = Instant::now();
            let x = source.samples(&seeds, None);
            gen_seconds += t.elapsed().as_secs_f64();
            match &self.fid {
                Some((net, mode, _)) => acc.add(&inception_features(net, *mode, &x, &self.device)),
                None => points.extend(x.data),
            }
            bar.inc(m as u64);
        }
        bar.finish_and_clear();
        let (fid, toy) = match (&self.fid, e.toy) {
            (Some((_, _, reference)), _) => (Some(frechet_distance(&acc.finish()?, reference)?), None),
            (None, Some(kind)) => {
                let ev: ToyEval = toy_eval_of(&points, &ToyDistribution::new(kind), e.seed, nfe);
                eprintln!("{model}: {}", ev.summary());
                (None, Some(serde_json::to_value(&ev)?))
            }
            (None, None) => (None, None),
        };
        if let Some(f) = fid {
            eprintln!("{model}: FID-{n} {f:.3} at {nfe} NFE");
        }
        Ok(ModelRow {
            model: model.to_string(),
            nfe,
            num_samples: n,
            fid,
            toy,
            sampling_ms_per_sample: 1000.0 * gen_seconds / n as f64,
            samples_per_s: n as f64 / gen_seconds.max(1e-12),
            batch: e.batch,
        })
    }
}

/// The FID reference statistics: read, or computed from the data and written.
fn reference_of(cfg: &ExperimentConfig, f: &FidEval, net: &FidInception, device: &burn::tensor::Device) -> Result<FidStats> {
    // The settings the statistics were computed with sit beside them; a file without (e.g.
    // EDM's published statistics) is taken as given.
    let settings = serde_json::json!({ "reference_num": f.reference_num, "mode": f.mode, "reference_data": f.reference_data, "teacher_data": cfg.teacher.train.as_ref().map(|t| &t.data) });
    let sidecar = f.reference.with_extension("json");
    if f.reference.exists() {
        if let Ok(text) = std::fs::read_to_string(&sidecar) {
            if serde_json::from_str::<serde_json::Value>(&text).ok().as_ref() != Some(&settings) {
                bail!("eval.fid.reference: {} was computed with other settings ({}); delete it or name another file", f.reference.display(), sidecar.display());
            }
        }
        return FidStats::read_npz(&f.reference);
    }
    let data = match (&f.reference_data, &cfg.teacher.train) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.data.clone(),
        (None, None) => bail!("eval.fid.reference: {} does not exist; give eval.fid.reference_data to compute it", f.reference.display()),
    };
    let stats = reference_stats(net, FidPreprocess::from(f.mode), &data, f.reference_num, cfg.eval.batch, device)?;
    stats.write_npz(&f.reference)?;
    write_atomic(&sidecar, serde_json::to_string_pretty(&settings)?.as_bytes())?;
    eprintln!("FID reference statistics of {} images: {}", f.reference_num, f.reference.display());
    Ok(stats)
}

fn inception_features(net: &FidInception, mode: FidPreprocess, x: &HostTensor, device: &burn::tensor::Device) -> Vec<f32> {
    HostTensor::from_tensor(crate::fid::image_features(net, mode, x, device)).data
}

/// Inception statistics of `n` images drawn at random (with replacement, fixed seed) from
/// `data`, as the teacher sees them in training.
fn reference_stats(net: &FidInception, mode: FidPreprocess, data: &DataConfig, n: usize, batch: usize, device: &burn::tensor::Device) -> Result<FidStats> {
    let source = DataSource::open(data)?;
    let mut rng = StdRng::seed_from_u64(0x5eed_f1d0);
    let mut acc = StatsAccumulator::new(2048);
    let bar = progress(n as u64, "FID reference");
    for start in (0..n).step_by(batch) {
        let m = (start + batch).min(n) - start;
        let (x, _) = source.batch(m, &mut rng)?;
        acc.add(&inception_features(net, mode, &x, device));
        bar.inc(m as u64);
    }
    bar.finish_and_clear();
    acc.finish()
}

/// Teacher (multi-step) beside generator (one step), the same seeds and classes: images as
/// two grids side by side, points as two scatter plots.
fn write_grid(path: &Path, teacher: Option<&ImageSource>, generator: &ImageSource, cfg: &ExperimentConfig) -> Result<()> {
    let e = &cfg.eval;
    let points = generator.net.image_shape() == [2, 1, 1];
    let n = if points { e.num_samples.min(2000) } else { e.grid_seeds.max(1) };
    let seeds: Vec<u64> = (0..n as u64).map(|i| e.seed + i).collect();
    let sets: Vec<HostTensor> = teacher.into_iter().chain(std::iter::once(generator)).map(|s| s.samples(&seeds, None)).collect();
    let png = if points {
        let size = 512;
        let canvases: Vec<Vec<u8>> = sets.iter().map(|s| scatter_canvas(&[(s, [20, 60, 200])], size)).collect();
        side_by_side(&canvases, 3, size, size)?
    } else {
        // Rows of `cols` seeds: the teacher's images, then the generator's, per row.
        let cols = (n as f64).sqrt().ceil() as usize;
        let mut parts = Vec::new();
        for start in (0..n).step_by(cols) {
            let end = (start + cols).min(n);
            for s in &sets {
                parts.push(rows(s, start, end));
                if end - start < cols {
                    // Pad the last row so both halves stay aligned.
                    let mut pad = rows(s, 0, cols - (end - start));
                    pad.data.iter_mut().for_each(|v| *v = -1.0);
                    parts.push(pad);
                }
            }
        }
        grid_png_cols(&concat_rows(&parts), cols * sets.len())?
    };
    Ok(write_atomic(path, &png)?)
}

fn side_by_side(canvases: &[Vec<u8>], c: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let gap = 8;
    let total_w = canvases.len() * w + (canvases.len().saturating_sub(1)) * gap;
    let mut out = vec![255u8; c * h * total_w];
    for (k, canvas) in canvases.iter().enumerate() {
        for ch in 0..c {
            for y in 0..h {
                let dst = ch * h * total_w + y * total_w + k * (w + gap);
                out[dst..dst + w].copy_from_slice(&canvas[ch * h * w + y * w..ch * h * w + (y + 1) * w]);
            }
        }
    }
    encode_png(&out, c, h, total_w)
}

// ---------------------------------------------------------------------------------------------
// Reports

fn fmt_row(row: &ModelRow) -> (String, String) {
    let quality = match (&row.fid, &row.toy) {
        (Some(f), _) => format!("FID-{} {f:.2}", row.num_samples),
        (None, Some(t)) => {
            let ed = t["energy_distance"].as_f64().unwrap_or(f64::NAN);
            match t.get("modes").filter(|m| !m.is_null()) {
                Some(m) => format!(
                    "ED {ed:.4}, {}/{} modes, {:.1}% near a mode, mode KL {:.3}",
                    m["modes_covered"],
                    m["num_modes"],
                    100.0 * m["frac_near_mode"].as_f64().unwrap_or(0.0),
                    m["mode_kl"].as_f64().unwrap_or(0.0)
                ),
                None => format!("ED {ed:.4}"),
            }
        }
        _ => "-".into(),
    };
    (quality, format!("{:.3}", row.sampling_ms_per_sample))
}

/// A markdown table: one teacher row (from the first experiment that has one), then a row per
/// experiment's generator.
pub fn table_markdown(runs: &[ExperimentMetrics], with_teacher: bool) -> String {
    let mut s = String::from("| model | NFE | quality | ms / sample | paper |\n| --- | --- | --- | --- | --- |\n");
    if with_teacher {
        if let Some(t) = runs.iter().find_map(|r| r.teacher.as_ref()) {
            let (q, ms) = fmt_row(t);
            s += &format!("| teacher (Heun) | {} | {q} | {ms} | |\n", t.nfe);
        }
    }
    for r in runs {
        if let Some(g) = &r.generator {
            let (q, ms) = fmt_row(g);
            s += &format!("| {} | {} | {q} | {ms} | {} |\n", if r.title.is_empty() { &r.experiment } else { &r.title }, g.nfe, r.paper.clone().unwrap_or_default());
        }
    }
    s
}

fn notes_of(results: &Path) -> String {
    std::fs::read_to_string(results.join("notes.md")).map(|n| format!("\n{n}\n")).unwrap_or_default()
}

fn stage_lines(m: &ExperimentMetrics) -> String {
    m.stages
        .iter()
        .map(|(k, v)| match (v.skipped, v.seconds) {
            (false, Some(s)) => format!("- {k}: {s:.1} s\n"),
            (true, Some(s)) => format!("- {k}: {s:.1} s (measured by the run that made it)\n"),
            (_, None) => format!("- {k}: done by an earlier run (time not recorded)\n"),
        })
        .collect()
}

fn experiment_readme(m: &ExperimentMetrics, results: &Path) -> String {
    let mut s = format!("# {}: {}\n\n", m.experiment, m.title);
    s += &format!("Rerun (from the repository root):\n\n```sh\ncargo run --release -- {}\n```\n\n", m.command);
    s += &table_markdown(std::slice::from_ref(m), true);
    if let Some(x) = m.speedup {
        s += &format!("\nOne-step generation is {x:.1}x faster per sample than the teacher's sampler here.\n");
    }
    s += &format!(
        "\nMachine: {}; backend {}; commit {}; config hash {} (`config.toml` is the resolved config).\n\nStage wall times:\n{}",
        m.machine,
        m.backend,
        m.git_commit,
        m.config_hash,
        stage_lines(m)
    );
    s += "\n`samples.png`: the teacher (left) and the generator (right), same seeds and classes. `loss_*.png`: loss curves (see below).\n";
    s += crate::output::LOSS_CURVES_HELP;
    s += &notes_of(results);
    s
}

/// `a/b/../c` -> `a/c`, without touching the file system (for paths shown to users).
fn tidy(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir if out.file_name().is_some_and(|n| n != "..") => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Runs each experiment (skipping finished stages) and writes `results/<name>/README.md` and
/// `table.json` comparing them.
pub fn ablate(args: &AblateArgs) -> Result<()> {
    let (name, title, configs, set_dir) = match args.configs.as_slice() {
        [one] if read_table(one)?.contains_key("experiments") => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct AblationSet {
                name: String,
                #[serde(default)]
                title: String,
                experiments: Vec<PathBuf>,
            }
            let set: AblationSet = crate::checkpoint::read_toml(one)?;
            let dir = one.parent().unwrap_or(Path::new(".")).to_path_buf();
            let configs = set.experiments.iter().map(|p| tidy(&dir.join(p))).collect::<Vec<_>>();
            (args.name.clone().unwrap_or(set.name), set.title, configs, Some(one.clone()))
        }
        many => (args.name.clone().context("give --name for a list of experiment configs")?, String::new(), many.to_vec(), None),
    };
    let results = PathBuf::from("results").join(&name);
    let mut all = Vec::new();
    for path in &configs {
        let mut set = args.common.overrides();
        let exp_name = load_table(path, &[])?.get("name").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        set.insert(0, format!("results_dir=\"{}\"", results.join(&exp_name).display()));
        let table = load_table(path, &set)?;
        let cfg = ExperimentConfig::from_table(table.clone(), &path.display().to_string())?;
        let command = rerun_command("run", &sh_quote(&path.display().to_string()), &set);
        if let Some(m) = run(&cfg, &table, &command, args.common.until, args.common.force_resume)? {
            all.push(m);
        }
    }
    if all.is_empty() {
        return Ok(());
    }
    let command = match &set_dir {
        Some(p) => rerun_command("ablate", &sh_quote(&p.display().to_string()), &args.common.overrides()),
        None => rerun_command("ablate", &format!("--name {name} {}", configs.iter().map(|p| sh_quote(&p.display().to_string())).collect::<Vec<_>>().join(" ")), &args.common.overrides()),
    };
    let mut s = format!("# {name}{}\n\n", if title.is_empty() { String::new() } else { format!(": {title}") });
    s += &format!("Rerun (from the repository root; finished stages are skipped):\n\n```sh\ncargo run --release -- {command}\n```\n\n");
    s += &table_markdown(&all, true);
    s += &format!("\nMachine: {}; backend {}; commit {}.\n\n", all[0].machine, all[0].backend, all[0].git_commit);
    s += "Per experiment (its config, metrics.json, samples.png teacher | generator, loss curves):\n\n";
    for m in &all {
        s += &format!("- [`{0}/`]({0}/README.md): {1}\n", m.experiment, m.title);
    }
    s += &notes_of(&results);
    write_atomic(&results.join("README.md"), s.as_bytes())?;
    write_atomic(&results.join("table.json"), serde_json::to_string_pretty(&all)?.as_bytes())?;
    eprintln!("\n{}\ncomparison: {}", table_markdown(&all, true), results.join("README.md").display());
    Ok(())
}

pub fn run_cmd(args: &RunExperimentArgs) -> Result<()> {
    let set = args.common.overrides();
    let table = load_table(&args.config, &set)?;
    let cfg = ExperimentConfig::from_table(table.clone(), &args.config.display().to_string())?;
    let command = rerun_command("run", &sh_quote(&args.config.display().to_string()), &set);
    run(&cfg, &table, &command, args.common.until, args.common.force_resume).map(|_| ())
}

/// `dmd SUB ARGS --set ...`, each override quoted for a POSIX shell.
fn rerun_command(sub: &str, args: &str, set: &[String]) -> String {
    format!("{sub} {args}{}", set.iter().map(|s| format!(" --set {}", sh_quote(s))).collect::<String>())
}

/// Quotes `s` for a POSIX shell when it holds anything but plain path characters.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
