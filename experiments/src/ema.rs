//! Exponential moving average of a network's weights, with EDM's schedule (half-life in
//! images, ramped up with the number of images seen).

use dmd_models::weights::{flat_params, map_params_flat};
use burn::module::Module;

/// EDM's EMA decay for one step: 0.5^(batch / ema_nimg), ema_nimg = min(half-life,
/// images seen * rampup ratio).
pub fn ema_beta(batch_size: usize, images_seen: u64, halflife_kimg: f64, rampup_ratio: Option<f64>) -> f64 {
    let mut ema_nimg = halflife_kimg * 1000.0;
    if let Some(r) = rampup_ratio {
        ema_nimg = ema_nimg.min(images_seen as f64 * r);
    }
    0.5f64.powf(batch_size as f64 / ema_nimg.max(1e-8))
}

/// ema <- beta * ema + (1 - beta) * net, on the EMA's device (no autodiff).
pub fn ema_update<M: Module>(ema: M, net: &M, beta: f64) -> M {
    let current = flat_params(net);
    map_params_flat(ema, |key, e| {
        let n = current.get(key).expect("EMA and network have the same parameters").clone();
        let device = e.device();
        e.mul_scalar(beta) + n.to_device(&device).mul_scalar(1.0 - beta)
    })
}
