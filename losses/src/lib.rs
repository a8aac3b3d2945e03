//! Losses of dmd-burn, each a short function over backend-agnostic tensors.
//!
//! - [`edm`]: EDM's denoising score-matching loss, which trains the teacher.
//! - [`dmd`]: DMD's distribution-matching loss (generator) and fake-score loss.
//! - [`regression`]: DMD's regression loss on teacher pairs (L2, pseudo-Huber; LPIPS planned).

pub mod dmd;
pub mod edm;
pub mod regression;
