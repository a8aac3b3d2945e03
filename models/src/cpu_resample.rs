//! EDM's box resampling by 2 (ADM: `resample_filter=[1,1]`), 2x2 average pooling down and
//! pixel repetition up, as two operations with their own backward for Burn's flex CPU
//! backend. Each is the other's adjoint up to a factor: the gradient of the pooling is the
//! output gradient repeated and divided by 4, that of the repetition the 2x2 sums.
//!
//! Burn's average pooling backward and the expand/reshape repetition's backward (a sum over
//! broadcast axes) run single-threaded through strided iterators; here each is one parallel
//! pass over the planes. `nn::resample` sends float32 flex tensors here; other backends and
//! dtypes keep Burn's ops (calling these on another backend panics: registered for flex only).

use crate::cpu_conv::{assume_init, contiguous, uninit};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// [N, C, H, W] with H and W even -> [N, C, H/2, W/2] (`pool_2x2`: mean of each 2x2 block,
/// times `scale`), and [N, C, H, W] -> [N, C, 2H, 2W] (`repeat_2x2`: each value times `scale`
/// into its 2x2 block).
#[backend_extension(Flex, Autodiff)]
pub trait ResampleBackend: Backend {
    fn pool_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    fn repeat_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
}

fn planes(shape: &Shape) -> (usize, usize, usize) {
    (shape[0] * shape[1], shape[2], shape[3])
}

/// Plane by plane: out[i, j] = scale/4 * (x[2i, 2j] + x[2i, 2j+1] + x[2i+1, 2j] + x[2i+1, 2j+1]).
fn pool(x: &[f32], (planes, h, w): (usize, usize, usize), scale: f32) -> Vec<f32> {
    assert!(h % 2 == 0 && w % 2 == 0, "pool_2x2: {h}x{w} is not divisible by 2");
    let (ho, wo) = (h / 2, w / 2);
    let mut out = uninit(planes * ho * wo);
    let s = scale * 0.25;
    out.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(|(out, x)| {
        for (i, row) in out.chunks_exact_mut(wo).enumerate() {
            let (a, b) = (&x[2 * i * w..][..w], &x[(2 * i + 1) * w..][..w]);
            for (j, o) in row.iter_mut().enumerate() {
                o.write(s * ((a[2 * j] + a[2 * j + 1]) + (b[2 * j] + b[2 * j + 1])));
            }
        }
    });
    // Safety: every output value of every plane is written.
    unsafe { assume_init(out) }
}

/// Plane by plane: out[2i + a, 2j + b] = scale * x[i, j].
fn repeat(x: &[f32], (planes, h, w): (usize, usize, usize), scale: f32) -> Vec<f32> {
    let mut out = uninit(planes * 4 * h * w);
    out.par_chunks_mut(4 * h * w).zip(x.par_chunks(h * w)).for_each(|(out, x)| {
        for (i, rows) in out.chunks_exact_mut(4 * w).enumerate() {
            let src = &x[i * w..][..w];
            let (top, bottom) = rows.split_at_mut(2 * w);
            for (j, v) in src.iter().enumerate() {
                let v = v * scale;
                top[2 * j].write(v);
                top[2 * j + 1].write(v);
                bottom[2 * j].write(v);
                bottom[2 * j + 1].write(v);
            }
        }
    });
    // Safety: every output value of every plane is written.
    unsafe { assume_init(out) }
}

impl ResampleBackend for Flex {
    fn pool_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let x = contiguous(&x);
        let shape = x.layout().shape().clone();
        let out = pool(x.as_slice::<f32>().expect("pool_2x2 on flex: float32"), planes(&shape), scale as f32);
        FlexTensor::from_data(TensorData::new(out, Shape::from([shape[0], shape[1], shape[2] / 2, shape[3] / 2])))
    }

    fn repeat_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let x = contiguous(&x);
        let shape = x.layout().shape().clone();
        let out = repeat(x.as_slice::<f32>().expect("repeat_2x2 on flex: float32"), planes(&shape), scale as f32);
        FlexTensor::from_data(TensorData::new(out, Shape::from([shape[0], shape[1], shape[2] * 2, shape[3] * 2])))
    }
}

/// The backward of `pool_2x2(.., scale)`: `repeat_2x2(grad, scale / 4)`.
#[derive(Debug)]
struct PoolGrad;
/// The backward of `repeat_2x2(.., scale)`: `pool_2x2(grad, 4 scale)` (the 2x2 sums).
#[derive(Debug)]
struct RepeatGrad;

impl<B: Backend + ResampleBackend> Backward<B, 1> for PoolGrad {
    type State = f64;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::repeat_2x2(grad, ops.state / 4.0));
        }
    }
}

impl<B: Backend + ResampleBackend> Backward<B, 1> for RepeatGrad {
    type State = f64;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::pool_2x2(grad, ops.state * 4.0));
        }
    }
}

impl<B: Backend + ResampleBackend, C: CheckpointStrategy> ResampleBackend for Autodiff<B, C> {
    fn pool_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        match PoolGrad.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(scale, B::pool_2x2(x.into_parts().0, scale)),
            OpsKind::UnTracked(prep) => prep.finish(B::pool_2x2(x.into_parts().0, scale)),
        }
    }

    fn repeat_2x2(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        match RepeatGrad.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(scale, B::repeat_2x2(x.into_parts().0, scale)),
            OpsKind::UnTracked(prep) => prep.finish(B::repeat_2x2(x.into_parts().0, scale)),
        }
    }
}

/// 2x2 average pooling through `ResampleBackend` (differentiable; flex, float32).
pub fn avg_pool_2x2(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as ResampleBackend>::pool_2x2(x.into_dispatch(), 1.0))
}

/// Nearest-neighbour upsampling by 2 through `ResampleBackend` (differentiable; flex, float32).
pub fn repeat_2x2(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as ResampleBackend>::repeat_2x2(x.into_dispatch(), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_and_repetition_match_their_definitions_and_are_adjoint() {
        let (planes_, h, w) = (3, 4, 6);
        let x: Vec<f32> = (0..planes_ * h * w).map(|i| (i * 7 % 11) as f32 - 5.0).collect();
        let pooled = pool(&x, (planes_, h, w), 2.0);
        for p in 0..planes_ {
            for i in 0..h / 2 {
                for j in 0..w / 2 {
                    let at = |r: usize, c: usize| x[p * h * w + r * w + c];
                    let want = 2.0 * (at(2 * i, 2 * j) + at(2 * i, 2 * j + 1) + at(2 * i + 1, 2 * j) + at(2 * i + 1, 2 * j + 1)) / 4.0;
                    assert_eq!(pooled[p * (h / 2) * (w / 2) + i * (w / 2) + j], want);
                }
            }
        }
        let y: Vec<f32> = (0..planes_ * (h / 2) * (w / 2)).map(|i| (i * 5 % 7) as f32 - 3.0).collect();
        let repeated = repeat(&y, (planes_, h / 2, w / 2), 3.0);
        for (k, v) in repeated.iter().enumerate() {
            let (p, r, c) = (k / (h * w), k % (h * w) / w, k % w);
            assert_eq!(*v, 3.0 * y[p * (h / 2) * (w / 2) + r / 2 * (w / 2) + c / 2]);
        }
        // <pool(x), y> = <x, repeat(y) / 4>: the gradients each backward uses.
        let lhs: f32 = pool(&x, (planes_, h, w), 1.0).iter().zip(&y).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(repeat(&y, (planes_, h / 2, w / 2), 0.25)).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
    }
}
