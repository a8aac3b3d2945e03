//! Data for dmd-burn: EDM's image dataset format (folder or zip of PNGs + `dataset.json`),
//! MNIST-style IDX files, built-in 2-D toy distributions, and text prompts for text-to-image
//! distillation.

pub mod image;
pub mod prompts;
pub mod toy;

pub use image::{to_model_space, to_pixels, DataError, ImageDataset};
pub use prompts::{PromptError, PromptSet};
pub use toy::{GaussianMixture, ToyDistribution, ToyKind};
