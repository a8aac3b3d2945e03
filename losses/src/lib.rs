//! Losses of dmd-burn, each a short function over backend-agnostic tensors.
//!
//! - [`edm`]: EDM's denoising score-matching loss, which trains the teacher.
//! - [`dmd`]: DMD's distribution-matching loss (generator) and fake-score loss.
//! - [`gan`]: DMD2's GAN term on the fake score's bottleneck.
//! - [`regression`]: DMD's regression loss on teacher pairs (LPIPS, L2, pseudo-Huber).

pub mod dmd;
pub mod edm;
pub mod gan;
pub mod regression;
