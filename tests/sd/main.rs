//! Stable Diffusion v1.5 (text-to-image) against diffusers and transformers
//! (`../shared/reference/sd/`), and DMD on its latents end to end. One test binary for all of
//! them: each integration test binary links the whole of Burn.

#[path = "../common/mod.rs"]
mod common;

mod distill;
mod sampling;
mod text;
mod unet;
mod vae;
