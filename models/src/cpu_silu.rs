//! SiLU as one operation with its own backward, for Burn's flex CPU backend.
//!
//! Written with Burn's tensor ops, SiLU is four element-wise passes forward (neg, exp, +1,
//! divide) and about as many backward, each allocating, single-threaded below Burn's size
//! threshold, with `exp` a scalar libm call per value: on adm_tiny it cost more than its
//! 3x3 convolutions (`dmd bench --ops`). Here the forward pass and the gradient are one
//! multi-threaded pass each, with an exponential the compiler vectorises (`cpu_exp`), and
//! the backward keeps only the input.
//!
//! `nn::silu` sends float32 flex tensors here, and CubeCL (CUDA) tensors to the same
//! operation's CubeCL kernels (`cube_silu`, in float32); other backends (ndarray, and CUDA
//! under Burn's fusion, which can fuse the composite) and flex's other dtypes keep its
//! composite (calling this on another backend panics).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::cpu_conv::{assume_init, contiguous, uninit};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// x / (1 + exp(-x)), the exponent capped at 80 (as `nn::silu`: no overflow, and SiLU is 0 to
/// float32 precision below -80 either way).
// CubeCL: `cube_silu` (see models/build.rs for `cube_kernels`).
#[backend_extension(Flex, Cube: cfg(cube_kernels), Autodiff)]
pub trait SiluBackend: Backend {
    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient for `x` given the output's gradient `grad`: grad * s * (1 + x (1 - s)),
    /// s = sigmoid(x).
    fn silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("silu on flex: contiguous float32 tensors")
}

impl SiluBackend for Flex {
    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = contiguous(&x);
        let out = map_chunks(f32s(&x), None, |x, _, y| kernels::silu(x, y));
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
    }

    fn silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, grad) = (contiguous(&x), contiguous(&grad));
        let out = map_chunks(f32s(&x), Some(f32s(&grad)), |x, g, dx| kernels::silu_backward(x, g.expect("gradient"), dx));
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
    }
}

/// `f(x_chunk, grad_chunk, out_chunk)` over 16k-value chunks, in parallel; `f` writes every
/// value of its output chunk.
fn map_chunks(x: &[f32], grad: Option<&[f32]>, f: impl Fn(&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut out = uninit(x.len());
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, y)| {
        let range = i * CHUNK..i * CHUNK + y.len();
        f(&x[range.clone()], grad.map(|g| &g[range]), y)
    });
    // Safety: the kernels write every value of their chunk.
    unsafe { assume_init(out) }
}

/// The loops, compiled twice on x86-64: for AVX2 (chosen at run time where the CPU has it)
/// and for the baseline. No fused multiply-adds either way, so both give the same bits.
pub(crate) mod kernels {
    use std::mem::MaybeUninit;

    /// 1 + exp(-x), the exponent capped at 80.
    #[inline(always)]
    fn one_plus_exp_neg(x: f32) -> f32 {
        1.0 + crate::cpu_exp::exp((-x).min(80.0))
    }

    #[inline(always)]
    fn silu_generic(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x / one_plus_exp_neg(x));
        }
    }

    #[inline(always)]
    fn silu_backward_generic(x: &[f32], grad: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
            let s = 1.0 / one_plus_exp_neg(x);
            dx.write(g * (s * (1.0 + x * (1.0 - s))));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn silu_avx2(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        silu_generic(x, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn silu_backward_avx2(x: &[f32], grad: &[f32], dx: &mut [MaybeUninit<f32>]) {
        silu_backward_generic(x, grad, dx)
    }

    pub fn silu(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU has AVX2.
            return unsafe { silu_avx2(x, y) };
        }
        silu_generic(x, y)
    }

    pub fn silu_backward(x: &[f32], grad: &[f32], dx: &mut [MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU has AVX2.
            return unsafe { silu_backward_avx2(x, grad, dx) };
        }
        silu_backward_generic(x, grad, dx)
    }

}

#[derive(Debug)]
struct SiluGrad;

impl<B: Backend + SiluBackend> Backward<B, 1> for SiluGrad {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ops.state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::silu_backward(x, grad));
        }
    }
}

impl<B: Backend + SiluBackend, C: CheckpointStrategy> SiluBackend for Autodiff<B, C> {
    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SiluGrad.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                let out = B::silu(x.into_parts().0);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::silu(x.into_parts().0)),
        }
    }

    fn silu_backward(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("silu_backward runs on the inner backend (no second-order gradients)")
    }
}

/// SiLU through `SiluBackend` (differentiable; flex, float32).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SiluBackend>::silu(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::kernels;

    #[test]
    fn silu_and_its_gradient_match_the_definition() {
        let x: Vec<f32> = (0..40_001).map(|i| -80.0 + 180.0 * i as f32 / 40_000.0).collect();
        let grad: Vec<f32> = (0..x.len()).map(|i| 1.0 - (i % 7) as f32 * 0.25).collect();
        // 40001 values: three chunks of `map_chunks`, the last one short.
        let y = super::map_chunks(&x, None, |x, _, y| kernels::silu(x, y));
        let dx = super::map_chunks(&x, Some(&grad), |x, g, dx| kernels::silu_backward(x, g.unwrap(), dx));
        for i in 0..x.len() {
            let xi = x[i] as f64;
            let s = 1.0 / (1.0 + (-xi).exp());
            let (want_y, want_dx) = (xi * s, grad[i] as f64 * s * (1.0 + xi * (1.0 - s)));
            let tol = |w: f64| 4.0 * f32::EPSILON as f64 * w.abs().max(1e-30) + 1e-37;
            assert!((y[i] as f64 - want_y).abs() <= tol(want_y), "silu({xi}) = {} want {want_y}", y[i]);
            assert!((dx[i] as f64 - want_dx).abs() <= tol(want_dx) + 1e-6 * grad[i].abs() as f64, "silu'({xi}) = {} want {want_dx}", dx[i]);
        }
    }
}
