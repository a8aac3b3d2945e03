//! DMD2's GAN term: a classifier head on the fake score's bottleneck tells diffused real
//! images from diffused generator outputs; non-saturating losses (DMD2 `edm_guidance.py`,
//! `compute_cls_logits` with `diffusion_gan`).

use burn::tensor::Tensor;
use dmd_models::{EdmPrecond, GanHead};

/// Realism logits [N] of `image` diffused to `sigma` ([N]) with `noise` (`None`: the clean
/// image, DMD2 without `diffusion_gan`), read from the fake score's bottleneck.
pub fn realism_logits(
    fake_score: &EdmPrecond,
    head: &GanHead,
    image: Tensor<4>,
    sigma: Tensor<1>,
    noise: Option<Tensor<4>>,
    labels: Option<Tensor<2>>,
) -> Tensor<1> {
    let n = image.dims()[0];
    let x = match noise {
        Some(noise) => image + noise * sigma.clone().reshape([n, 1, 1, 1]),
        None => image,
    };
    head.forward(fake_score.bottleneck(x, sigma, labels))
}

/// The generator's loss: softplus(-logits(fake)), averaged.
pub fn generator_gan_loss(logits_fake: Tensor<1>) -> Tensor<1> {
    softplus(logits_fake.neg()).mean()
}

/// The classifier's loss: softplus(logits(fake)) + softplus(-logits(real)), averaged.
pub fn discriminator_gan_loss(logits_real: Tensor<1>, logits_fake: Tensor<1>) -> Tensor<1> {
    (softplus(logits_fake) + softplus(logits_real.neg())).mean()
}

/// log(1 + e^x), without overflow for large x.
fn softplus(x: Tensor<1>) -> Tensor<1> {
    x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
}
