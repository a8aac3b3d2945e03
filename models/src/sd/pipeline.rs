//! Stable Diffusion's text-to-image pipeline from a diffusers folder: prompts -> CLIP text
//! embeddings, classifier-free-guided epsilon, a PNDM or DDIM run over the latents, and the
//! VAE decoder. The same pieces serve DMD on latents: the UNet in EDM's terms is a denoiser
//! D(x; sigma_t) = x - sigma_t eps(sqrt(a_t) x, t) (see [`eps_to_x0`]).

use super::clip::ClipTextModel;
use super::scheduler::{sample, SchedulerConfig, SchedulerError, SchedulerKind};
use super::tokenizer::{ClipTokenizer, TokenizerError, MAX_LENGTH};
use super::unet::{PerBlock, UNet2DCondition};
use super::vae::AutoencoderKL;
use crate::precond::ModelError;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SdError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// Parts that do not fit together, or a sampler setting out of range.
    #[error("{0}")]
    Invalid(String),
}

/// A whole SD v1.5 model (any of its parts may be swapped: DMD's generator is another UNet).
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DCondition,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    pub device: Device,
}

impl StableDiffusion {
    /// Loads `dir`'s `tokenizer/`, `text_encoder/`, `unet/`, `vae/` and `scheduler/` (the last
    /// optional: SD v1.5's PNDM config by default), and checks that they fit together.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, SdError> {
        if !dir.is_dir() {
            return Err(SdError::Invalid(format!(
                "{}: not a folder (give a diffusers Stable Diffusion folder with text_encoder/, tokenizer/, unet/, vae/)",
                dir.display()
            )));
        }
        let sd = Self {
            tokenizer: ClipTokenizer::load(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), device)?,
            unet: UNet2DCondition::load(&dir.join("unet"), device)?,
            vae: AutoencoderKL::load(&dir.join("vae"), device)?,
            scheduler: SchedulerConfig::from_sd_dir(dir)?,
            device: device.clone(),
        };
        sd.check_unet(&sd.unet, &dir.join("unet").join("config.json"))?;
        let (clip, vocab) = (dir.join("text_encoder").join("config.json"), sd.text_encoder.config.vocab_size);
        if sd.text_encoder.max_positions() < MAX_LENGTH {
            return Err(SdError::Invalid(format!("{}: max_position_embeddings {} is below the tokenizer's {MAX_LENGTH}", clip.display(), sd.text_encoder.max_positions())));
        }
        if vocab < sd.tokenizer.vocab_size() && vocab < 3 {
            return Err(SdError::Invalid(format!("{}: vocab_size {vocab} is too small", clip.display())));
        }
        Ok(sd)
    }

    /// Errors unless `unet` (the teacher's, or a generator) fits this text encoder and VAE;
    /// `config` names its file.
    pub fn check_unet(&self, unet: &UNet2DCondition, config: &Path) -> Result<(), SdError> {
        let c = unet.config();
        let bad = |key: &str, msg: String| Err(SdError::Invalid(format!("{}: {key}: {msg}", config.display())));
        let hidden = self.text_encoder.hidden_size();
        let cross = match &c.cross_attention_dim {
            PerBlock::One(v) => vec![*v],
            PerBlock::Each(v) => v.clone(),
        };
        if cross.iter().any(|&d| d != hidden) {
            return bad("cross_attention_dim", format!("{cross:?} does not match the text encoder's hidden_size {hidden}"));
        }
        let latent = self.vae.latent_channels();
        if c.in_channels != latent || c.out_channels != latent {
            return bad("in_channels, out_channels", format!("{} and {} do not match the VAE's latent_channels {latent}", c.in_channels, c.out_channels));
        }
        if c.sample_size == 0 {
            return bad("sample_size", "must be positive".into());
        }
        let teacher = self.unet.config().sample_size;
        if c.sample_size != teacher {
            return bad("sample_size", format!("{} differs from the teacher's {teacher}", c.sample_size));
        }
        Ok(())
    }

    /// Token ids [N, 77] of `prompts`. A shrunk test encoder (vocabulary smaller than the
    /// tokenizer's, as the reference's tiny SD) gets start and end as its last two ids and the
    /// other ids folded into the rest, so that the real tokenizer can drive it.
    pub fn token_ids(&self, prompts: &[String]) -> Tensor<2, Int> {
        let vocab = self.text_encoder.config.vocab_size as u32;
        let (start, end) = (self.tokenizer.start_id(), self.tokenizer.end_id());
        let full = vocab as usize >= self.tokenizer.vocab_size();
        let fold = |id: u32| match id {
            _ if full => id,
            _ if id == start => vocab - 2,
            _ if id == end => vocab - 1,
            _ => id % (vocab - 2),
        };
        let ids: Vec<i64> = prompts.iter().flat_map(|p| self.tokenizer.encode(p)).map(|i| fold(i) as i64).collect();
        let n = prompts.len();
        Tensor::from_data(TensorData::new(ids.clone(), [n, ids.len() / n.max(1)]), &self.device)
    }

    /// The text encoder's last hidden state [N, 77, D] for `prompts` ("" is the unconditional
    /// embedding of classifier-free guidance).
    pub fn encode_prompts(&self, prompts: &[String]) -> Tensor<3> {
        self.text_encoder.forward(self.token_ids(prompts))
    }

    /// Latent shape [C, H, W] the UNet works on (SD v1.5: [4, 64, 64] for 512x512 images).
    pub fn latent_shape(&self) -> [usize; 3] {
        let c = self.unet.config();
        [c.in_channels, c.sample_size, c.sample_size]
    }

    /// Teacher sampling: `num_steps` of `kind` with guidance `guidance` (1: none) from
    /// `latents` (standard normal noise) to the final latents.
    pub fn sample_latents(
        &self,
        kind: SchedulerKind,
        num_steps: usize,
        guidance: f64,
        latents: Tensor<4>,
        cond: Tensor<3>,
        uncond: Tensor<3>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor<4>, SdError> {
        let eps = |x: Tensor<4>, t: usize| {
            let n = x.dims()[0];
            guided_eps(&self.unet, x, Tensor::full([n], t as f64, &self.device), cond.clone(), uncond.clone(), guidance)
        };
        sample(&self.scheduler, kind, num_steps, latents, eps, progress).map_err(SdError::Invalid)
    }

    /// Images in [-1, 1] from (scaled) latents: the VAE decoder after undoing the latent scale.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.vae.decode(latents.div_scalar(self.vae.scaling_factor())).clamp(-1.0, 1.0)
    }
}

/// eps_uncond + w (eps_cond - eps_uncond), the two halves in one UNet call as diffusers makes
/// it; `uncond` [1, L, D] is broadcast over the batch. w = 1 skips the unconditional half.
pub fn guided_eps(unet: &UNet2DCondition, x: Tensor<4>, t: Tensor<1>, cond: Tensor<3>, uncond: Tensor<3>, guidance: f64) -> Tensor<4> {
    let n = x.dims()[0];
    if guidance == 1.0 {
        return unet.forward(x, t, cond);
    }
    let [_, l, d] = cond.dims();
    let uncond = uncond.expand([n, l, d]);
    let eps = unet.forward(Tensor::cat(vec![x.clone(), x], 0), Tensor::cat(vec![t.clone(), t], 0), Tensor::cat(vec![uncond, cond], 0));
    let (e_u, e_c) = (eps.clone().narrow(0, 0, n), eps.narrow(0, n, n));
    e_u.clone() + (e_c - e_u).mul_scalar(guidance)
}

/// x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), per sample (`alpha` [N] holds a_t).
pub fn eps_to_x0(x_t: Tensor<4>, eps: Tensor<4>, alpha: Tensor<1>) -> Tensor<4> {
    let a = alpha.reshape([-1, 1, 1, 1]);
    (x_t - eps * a.clone().neg().add_scalar(1.0).sqrt()) / a.sqrt()
}

/// x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise (diffusers' `add_noise`).
pub fn add_noise(x0: Tensor<4>, noise: Tensor<4>, alpha: Tensor<1>) -> Tensor<4> {
    let a = alpha.reshape([-1, 1, 1, 1]);
    x0 * a.clone().sqrt() + noise * a.neg().add_scalar(1.0).sqrt()
}
