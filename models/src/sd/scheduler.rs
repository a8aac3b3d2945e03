//! Stable Diffusion's discrete noise schedule and its two usual samplers, as diffusers runs
//! them for SD v1.5: PNDM in its PLMS form (`skip_prk_steps`) and DDIM (eta 0), both with
//! "leading" timestep spacing, epsilon prediction.
//!
//! A timestep t in [0, 1000) has noise x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with
//! a_t = `alphas_cumprod[t]`. In EDM's terms (x / sqrt(a_t) = x_0 + sigma eps) that is the
//! noise level sigma_t = sqrt((1 - a_t) / a_t), which is how DMD's losses see this teacher.

use burn::tensor::Tensor;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct SchedulerError {
    pub path: String,
    pub msg: String,
}

/// `scheduler/scheduler_config.json`; defaults are SD v1.5's (a PNDM config: scaled_linear
/// betas 0.00085..0.012, `set_alpha_to_one` false, `steps_offset` 1, `skip_prk_steps`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub skip_prk_steps: bool,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Options of diffusers' schedulers this port does not implement; refused when set.
    pub trained_betas: Option<serde_json::Value>,
    pub rescale_betas_zero_snr: bool,
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            set_alpha_to_one: false,
            steps_offset: 1,
            skip_prk_steps: true,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            clip_sample: false,
            clip_sample_range: 1.0,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

impl SchedulerConfig {
    /// Reads `path` (unknown keys such as `_class_name` are ignored) and checks it.
    pub fn from_json_file(path: &Path) -> Result<Self, SchedulerError> {
        let err = |msg: String| SchedulerError { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// `SD_DIR/scheduler/scheduler_config.json` when present, SD v1.5's values otherwise.
    pub fn from_sd_dir(dir: &Path) -> Result<Self, SchedulerError> {
        let path = dir.join("scheduler").join("scheduler_config.json");
        if path.is_file() {
            Self::from_json_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(2..=100_000).contains(&self.num_train_timesteps) {
            return Err(format!("num_train_timesteps: {} is outside [2, 100000]", self.num_train_timesteps));
        }
        if !(self.beta_start > 0.0 && self.beta_start < self.beta_end && self.beta_end < 1.0) {
            return Err(format!("beta_start, beta_end: need 0 < {} < {} < 1", self.beta_start, self.beta_end));
        }
        if !matches!(self.beta_schedule.as_str(), "scaled_linear" | "linear") {
            return Err(format!("beta_schedule: `{}` is not supported (scaled_linear, linear)", self.beta_schedule));
        }
        if self.prediction_type != "epsilon" {
            return Err(format!("prediction_type: `{}` is not supported (epsilon)", self.prediction_type));
        }
        if self.timestep_spacing != "leading" {
            return Err(format!("timestep_spacing: `{}` is not supported (leading)", self.timestep_spacing));
        }
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("trained_betas: explicit betas are not supported (use beta_start, beta_end, beta_schedule)".into());
        }
        if self.rescale_betas_zero_snr || self.thresholding {
            return Err("rescale_betas_zero_snr, thresholding: not supported (must be false)".into());
        }
        if !(self.clip_sample_range > 0.0 && self.clip_sample_range.is_finite()) {
            return Err(format!("clip_sample_range: {} must be positive", self.clip_sample_range));
        }
        if self.steps_offset >= self.num_train_timesteps {
            return Err(format!("steps_offset: {} is not below num_train_timesteps", self.steps_offset));
        }
        Ok(())
    }

    /// a_t = prod_{s <= t} (1 - beta_s), in float64 (diffusers computes it in float32; the two
    /// agree within 1e-6 relative).
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let ramp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (n - 1) as f64;
        let mut prod = 1.0;
        (0..n)
            .map(|i| {
                let beta = match self.beta_schedule.as_str() {
                    "linear" => ramp(self.beta_start, self.beta_end, i),
                    _ => ramp(self.beta_start.sqrt(), self.beta_end.sqrt(), i).powi(2),
                };
                prod *= 1.0 - beta;
                prod
            })
            .collect()
    }

    fn step_ratio(&self, num_steps: usize) -> usize {
        (self.num_train_timesteps / num_steps).max(1)
    }

    /// "Leading" spacing: 0, r, 2r, ... (r = T / steps) plus `steps_offset`, descending.
    fn leading(&self, num_steps: usize) -> Vec<usize> {
        let r = self.step_ratio(num_steps);
        (0..num_steps).rev().map(|i| i * r + self.steps_offset).collect()
    }
}

/// Which sampler the teacher runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Pndm,
    Ddim,
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pndm" | "plms" => Ok(Self::Pndm),
            "ddim" => Ok(Self::Ddim),
            _ => Err(format!("unknown scheduler `{s}` (pndm, ddim)")),
        }
    }
}

/// One sampler run: the timesteps at which the UNet is called, in order, and the update
/// after each call.
pub struct Scheduler {
    kind: SchedulerKind,
    alphas_cumprod: Vec<f64>,
    /// a_{-1}: the "alpha" of the step past t = 0.
    final_alpha: f64,
    step_ratio: usize,
    clip_sample: bool,
    clip_sample_range: f64,
    timesteps: Vec<usize>,
    // PLMS state: the last four epsilons, calls so far, and the sample held across the
    // first step's two calls.
    ets: Vec<Tensor<4>>,
    counter: usize,
    cur_sample: Option<Tensor<4>>,
}

impl Scheduler {
    pub fn new(cfg: &SchedulerConfig, kind: SchedulerKind, num_steps: usize) -> Result<Self, String> {
        if num_steps == 0 || num_steps > cfg.num_train_timesteps {
            return Err(format!("{num_steps} sampler steps are outside [1, {}]", cfg.num_train_timesteps));
        }
        let alphas_cumprod = cfg.alphas_cumprod();
        let final_alpha = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let base = cfg.leading(num_steps);
        if base[0] >= cfg.num_train_timesteps {
            // e.g. 1000 steps of 1000 with steps_offset 1 would start at t = 1000.
            return Err(format!(
                "{num_steps} sampler steps with steps_offset {} start at t = {}, past the last timestep {}",
                cfg.steps_offset,
                base[0],
                cfg.num_train_timesteps - 1
            ));
        }
        let timesteps = match kind {
            SchedulerKind::Ddim => base,
            SchedulerKind::Pndm => {
                if !cfg.skip_prk_steps {
                    return Err("skip_prk_steps: only PNDM's PLMS form (skip_prk_steps = true) is supported".into());
                }
                // PLMS's first step takes two calls: [t0, t1, t1, t2, ...] (diffusers' order).
                let mut t = base;
                if t.len() >= 2 {
                    t.insert(2, t[1]);
                }
                t
            }
        };
        Ok(Self {
            kind,
            alphas_cumprod,
            final_alpha,
            step_ratio: cfg.step_ratio(num_steps),
            clip_sample: cfg.clip_sample,
            clip_sample_range: cfg.clip_sample_range,
            timesteps,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    /// The UNet is called once per entry, in this order (PNDM: steps + 1 calls).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn alpha(&self, t: isize) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha
        }
    }

    /// x_{t'} from x_t and the epsilon predicted at the `i`-th timestep.
    pub fn step(&mut self, eps: Tensor<4>, i: usize, sample: Tensor<4>) -> Tensor<4> {
        let t = self.timesteps[i];
        match self.kind {
            SchedulerKind::Ddim => self.ddim_step(eps, t, sample),
            SchedulerKind::Pndm => self.plms_step(eps, t, sample),
        }
    }

    fn ddim_step(&self, eps: Tensor<4>, t: usize, x: Tensor<4>) -> Tensor<4> {
        let a_t = self.alpha(t as isize);
        let a_prev = self.alpha(t as isize - self.step_ratio as isize);
        let x0 = (x - eps.clone().mul_scalar((1.0 - a_t).sqrt())).div_scalar(a_t.sqrt());
        let r = self.clip_sample_range;
        let x0 = if self.clip_sample { x0.clamp(-r, r) } else { x0 };
        x0.mul_scalar(a_prev.sqrt()) + eps.mul_scalar((1.0 - a_prev).sqrt())
    }

    /// Pseudo linear multistep (Liu et al. 2022): a linear multistep combination of the last
    /// epsilons, pushed through the DDIM-like transfer `prev_sample`. The first step is a
    /// second-order (Heun-like) pair of calls at the same timestep.
    fn plms_step(&mut self, eps: Tensor<4>, t: usize, sample: Tensor<4>) -> Tensor<4> {
        let r = self.step_ratio as isize;
        let (mut t, mut prev_t) = (t as isize, t as isize - r);
        if self.counter != 1 {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(eps.clone());
        } else {
            prev_t = t;
            t += r;
        }
        let e = &self.ets;
        let n = e.len();
        let (eps, sample) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            (eps, sample)
        } else if n == 1 && self.counter == 1 {
            let held = self.cur_sample.take().expect("PLMS holds the first sample");
            ((eps + e[0].clone()).div_scalar(2.0), held)
        } else if n == 2 {
            ((e[1].clone().mul_scalar(3.0) - e[0].clone()).div_scalar(2.0), sample)
        } else if n == 3 {
            ((e[2].clone().mul_scalar(23.0) - e[1].clone().mul_scalar(16.0) + e[0].clone().mul_scalar(5.0)).div_scalar(12.0), sample)
        } else {
            let combo = e[3].clone().mul_scalar(55.0) - e[2].clone().mul_scalar(59.0) + e[1].clone().mul_scalar(37.0)
                - e[0].clone().mul_scalar(9.0);
            (combo.div_scalar(24.0), sample)
        };
        self.counter += 1;
        self.prev_sample(sample, t, prev_t, eps)
    }

    /// PNDM's transfer from t to prev_t given epsilon (its Eq. 9).
    fn prev_sample(&self, x: Tensor<4>, t: isize, prev_t: isize, eps: Tensor<4>) -> Tensor<4> {
        let (a_t, a_prev) = (self.alpha(t), self.alpha(prev_t));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        x.mul_scalar(sample_coeff) - eps.mul_scalar((a_prev - a_t) / denom)
    }
}

/// Runs a whole sampler from `latents` (pure noise; SD's samplers start at sigma 1), calling
/// `eps(x_t, t)` once per timestep and `progress` after each step.
pub fn sample(
    cfg: &SchedulerConfig,
    kind: SchedulerKind,
    num_steps: usize,
    latents: Tensor<4>,
    mut eps: impl FnMut(Tensor<4>, usize) -> Tensor<4>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Tensor<4>, String> {
    let mut scheduler = Scheduler::new(cfg, kind, num_steps)?;
    let steps = scheduler.timesteps().to_vec();
    let mut x = latents;
    for (i, &t) in steps.iter().enumerate() {
        let e = eps(x.clone(), t);
        x = scheduler.step(e, i, x);
        progress(i + 1, steps.len());
    }
    Ok(x)
}
