//! Losses of dmd-burn, each a short function over backend-agnostic tensors.
//!
//! - [`edm`]: EDM's denoising score-matching loss, which trains the teacher.

pub mod edm;
