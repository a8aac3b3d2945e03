//! Adam's and AdamW's parameter update as one parallel pass per parameter, for Burn's flex CPU
//! backend.
//!
//! Burn's `Adam` and `AdamW` update each parameter with about fifteen tensor ops (two moments,
//! bias corrections, square root, division, decay), each a fresh allocation and, on flex, a
//! single-threaded pass: 2.7 ms of adm_tiny's ~120 ms training step, with one core idle. Here
//! one kernel reads the parameter, its gradient and both moments once and writes the three
//! new tensors, with the same float32 operations in the same order as Burn's ops (the results
//! are the same bits; `experiments/src/optim.rs` tests that against Burn's optimisers).

use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::cpu_conv::{assume_init, contiguous, uninit};
use rayon::prelude::*;

/// One step's constants. With m1 = beta_1 m1 + (1 - beta_1) g and m2 = beta_2 m2 +
/// (1 - beta_2) g^2 the update is param * decay - lr * ((m1 * m1_scale) / m1_divisor) /
/// (sqrt(m2 / m2_divisor) + epsilon). Burn's Adam is m1_scale = sqrt(1 - beta_2^t) /
/// (1 - beta_1^t), divisors 1 and epsilon * sqrt(1 - beta_2^t); its AdamW is m1_scale 1,
/// divisors 1 - beta^t and the decay 1 - lr * weight_decay (multiplying or dividing by 1 is
/// exact, so each form keeps its own rounding).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub beta_1: f32,
    pub beta_2: f32,
    pub m1_scale: f32,
    pub m1_divisor: f32,
    pub m2_divisor: f32,
    pub epsilon: f32,
    pub decay: f32,
    pub lr: f32,
}

#[backend_extension(Flex)]
pub trait AdamBackend: Backend {
    /// (param, m1, m2) after one step (see [`AdamStep`]).
    #[allow(clippy::too_many_arguments)]
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m1: FloatTensor<Self>,
        m2: FloatTensor<Self>,
        beta_1: f32,
        beta_2: f32,
        m1_scale: f32,
        m1_divisor: f32,
        m2_divisor: f32,
        epsilon: f32,
        decay: f32,
        lr: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("adam_update on flex: contiguous float32 tensors")
}

impl AdamBackend for Flex {
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m1: FloatTensor<Self>,
        m2: FloatTensor<Self>,
        beta_1: f32,
        beta_2: f32,
        m1_scale: f32,
        m1_divisor: f32,
        m2_divisor: f32,
        epsilon: f32,
        decay: f32,
        lr: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let s = AdamStep { beta_1, beta_2, m1_scale, m1_divisor, m2_divisor, epsilon, decay, lr };
        let [param, grad, m1, m2] = [param, grad, m1, m2].map(|t| contiguous(&t));
        let (p, g, a, b) = (f32s(&param), f32s(&grad), f32s(&m1), f32s(&m2));
        let (mut new_p, mut new_a, mut new_b) = (uninit(p.len()), uninit(p.len()), uninit(p.len()));
        const CHUNK: usize = 1 << 14;
        new_p
            .par_chunks_mut(CHUNK)
            .zip(new_a.par_chunks_mut(CHUNK))
            .zip(new_b.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((np, na), nb))| {
                let r = i * CHUNK..i * CHUNK + np.len();
                for (k, j) in r.enumerate() {
                    // Burn's order: m * beta + g * (1 - beta), then the update.
                    let m1 = a[j] * s.beta_1 + g[j] * (1.0 - s.beta_1);
                    let m2 = b[j] * s.beta_2 + (g[j] * g[j]) * (1.0 - s.beta_2);
                    let update = ((m1 * s.m1_scale) / s.m1_divisor) / ((m2 / s.m2_divisor).sqrt() + s.epsilon);
                    np[k].write(p[j] * s.decay - update * s.lr);
                    na[k].write(m1);
                    nb[k].write(m2);
                }
            });
        let shape = param.layout().shape().clone();
        // Safety: every chunk writes all its values.
        let tensor = |v| FlexTensor::from_data(TensorData::new(unsafe { assume_init(v) }, shape.clone()));
        (tensor(new_p), tensor(new_a), tensor(new_b))
    }
}

/// Whether [`adam_update`] takes `t`: a float32 tensor on flex (not tracked by autodiff, as the
/// optimisers' tensors are).
pub fn takes<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && t.device() == Device::flex()
}

/// The step on a parameter, its gradient and moments, all of which [`takes`]: (param, m1, m2).
pub fn adam_update<const D: usize>(param: Tensor<D>, grad: Tensor<D>, m1: Tensor<D>, m2: Tensor<D>, s: AdamStep) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, a, b) = <Dispatch as AdamBackend>::adam_update(
        param.into_dispatch(),
        grad.into_dispatch(),
        m1.into_dispatch(),
        m2.into_dispatch(),
        s.beta_1,
        s.beta_2,
        s.m1_scale,
        s.m1_divisor,
        s.m2_divisor,
        s.epsilon,
        s.decay,
        s.lr,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(a), Tensor::from_dispatch(b))
}
