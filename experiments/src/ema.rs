//! Exponential moving average of a network's weights, with EDM's schedule (half-life in
//! images, ramped up with the number of images seen).

use dmd_models::fused_update::{self, UpdateQueue};
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

/// ema <- beta * ema + (1 - beta) * net, on the EMA's device (no autodiff): where
/// `fused_update` takes the tensors one kernel per parameter on flex (the same bits as Burn's
/// three ops) and one per 32 parameters on CUDA (queued, run at the end); Burn's ops elsewhere.
pub fn ema_update<M: Module>(ema: M, net: &M, beta: f64) -> M {
    let current = flat_params(net);
    let mut queue = UpdateQueue::default();
    let ema = map_params_flat(ema, |key, e| {
        let n = current.get(key).expect("EMA and network have the same parameters").clone();
        let n = n.to_device(&e.device());
        if fused_update::takes(&e) && fused_update::takes(&n) {
            queue.ema(e, n, beta)
        } else {
            e.mul_scalar(beta) + n.mul_scalar(1.0 - beta)
        }
    });
    queue.run();
    ema
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tensor, TensorData};

    /// The fused average is Burn's `ema * beta + net * (1 - beta)`, bit for bit, for EDM's
    /// decays and the edges, on a size spanning several parallel chunks.
    #[test]
    fn the_fused_average_is_burns() {
        let device = Device::flex();
        let len = 70_001u64;
        let values = |seed: u64| (0..len).map(|i| ((i * 2654435761 + seed * 40503) % 65536) as f32 / 32768.0 - 1.0).collect::<Vec<f32>>();
        let tensor = |seed| Tensor::<1>::from_data(TensorData::new(values(seed), [len as usize]), &device);
        let bits = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for beta in [0.0, 0.5, ema_beta(512, 10_000, 500.0, Some(0.05)), ema_beta(40, 10_000_000, 500.0, None), 1.0 - 1e-9] {
            let want = tensor(1).mul_scalar(beta) + tensor(2).mul_scalar(1.0 - beta);
            assert!(fused_update::takes(&tensor(1)));
            let got = fused_update::ema_update(tensor(1), tensor(2), beta);
            assert_eq!(bits(want), bits(got), "beta {beta}");
        }
    }
}
