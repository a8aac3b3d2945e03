//! Stable Diffusion v1.5 (the diffusers layout: `text_encoder/`, `tokenizer/`, `unet/`,
//! `vae/`, `scheduler/`): the CLIP tokenizer and text encoder, the `UNet2DConditionModel`, the
//! `AutoencoderKL`, and the PNDM and DDIM schedulers. Every network loads the diffusers
//! safetensors by their own names and reads its folder's `config.json`.

pub mod blocks;
pub mod clip;
pub mod pipeline;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;
