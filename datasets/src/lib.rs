//! Data for dmd-burn: EDM's image dataset format (folder or zip of PNGs + `dataset.json`),
//! MNIST-style IDX files, and built-in 2-D toy distributions.

pub mod image;
pub mod toy;

pub use image::{to_model_space, to_pixels, DataError, ImageDataset};
pub use toy::{GaussianMixture, ToyDistribution, ToyKind};
