//! DMD's regression loss between the generator's output for stored noise and the teacher's
//! ODE output for the same noise. DMD uses LPIPS; L2 and pseudo-Huber are offered too (and are
//! the only ones that make sense for 2-D toy data).

use burn::tensor::Tensor;
use dmd_models::Lpips;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Regression {
    /// No regression term (DMD2).
    #[default]
    None,
    /// Mean squared error over all elements.
    L2,
    /// sqrt(||x - y||^2 + c^2) - c per sample, c = 0.00054 sqrt(C H W) (consistency models).
    PseudoHuber,
    /// LPIPS (VGG16, v0.1 heads), DMD's choice for images.
    Lpips,
}

/// Mean squared error over all elements.
pub fn l2(x: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
    (x - y).square().mean()
}

/// Pseudo-Huber distance per sample, averaged over the batch.
pub fn pseudo_huber(x: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
    let [n, c, h, w] = x.dims();
    let k = 0.00054 * ((c * h * w) as f64).sqrt();
    let sq = (x - y).square().reshape([n, c * h * w]).sum_dim(1).reshape([n]);
    sq.add_scalar(k * k).sqrt().sub_scalar(k).mean()
}

/// LPIPS as DMD uses it: images upsampled to 224 when smaller, the distance averaged over the
/// batch. `x`, `y` in [-1, 1] with 1 or 3 channels.
pub fn lpips(x: Tensor<4>, y: Tensor<4>, net: &Lpips) -> Tensor<1> {
    net.distance_224(x, y).mean()
}
