//! EDM's self-attention (`nn::attention`) as one operation with its own backward, for Burn's
//! flex CPU backend.
//!
//! With Burn's tensor ops, attention at adm_tiny's 8x8 is mostly overhead: copies of the
//! q/k/v views and transposes, and a softmax of five passes forward and more backward; the
//! products themselves are tiny. Here each (sample, head) is one work unit: three matrix
//! products forward and five backward, read straight from the [q; k; v] input through
//! strides, with the softmax in one vectorised pass and the attention weights recomputed in
//! the backward pass rather than kept.
//!
//! `nn::attention` sends float32 flex tensors here, and CubeCL (CUDA) tensors to the same
//! operation's CubeCL implementation (`cube_attention`, in float32); other backends and flex's
//! other dtypes keep the composite (calling this on another backend panics).

use crate::cpu_conv::{SharedMut, assume_init, contiguous, matmul, uninit};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `qkv` [N, 3C, H, W] (per head: ch query, ch key, ch value channels, interleaved as EDM's
/// reshape to [N * heads, ch, 3, H * W] reads them) to [N, C, H, W]:
/// v softmax(q^T k / sqrt(ch))^T.
// CubeCL: `cube_attention` (see models/build.rs for `cube_kernels`).
#[backend_extension(Flex, Cube: cfg(cube_kernels), Autodiff)]
pub trait AttentionBackend: Backend {
    fn edm_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;

    /// The gradient for `qkv` given the output's gradient `grad`.
    fn edm_attention_backward(qkv: FloatTensor<Self>, grad: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
}

/// One attention's sizes: `units` = N * heads, `ch` channels per head, `hw` positions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    pub(crate) units: usize,
    pub(crate) ch: usize,
    pub(crate) hw: usize,
}

impl Sizes {
    pub(crate) fn new(qkv: &Shape, heads: usize) -> Self {
        let (n, c3) = (qkv[0], qkv[1]);
        assert!(c3 % (3 * heads) == 0, "attention: {c3} channels do not split into q, k, v of {heads} heads");
        Self { units: n * heads, ch: c3 / 3 / heads, hw: qkv.num_elements() / (n * c3).max(1) }
    }

    /// Pointers to unit `u`'s q, k and v, each [ch, hw] with rows 3 * hw apart.
    fn qkv(&self, qkv: *const f32, u: usize) -> [*const f32; 3] {
        // Safety (for callers): offsets inside the unit's 3 * ch * hw values.
        unsafe {
            let base = qkv.add(u * 3 * self.ch * self.hw);
            [base, base.add(self.hw), base.add(2 * self.hw)]
        }
    }
}

/// Per-thread buffers of one unit: hw x hw each.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    t: Vec<f32>,
    dp: Vec<f32>,
}

/// Row-wise softmax of `s` * `scale` in place ([rows, width]).
fn softmax_rows(s: &mut [f32], width: usize, scale: f32) {
    // Separate passes, the max and the sum in eight lanes: a running scalar max or sum
    // (an ordered float reduction) would keep the compiler from vectorising the loop.
    #[inline(always)]
    fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [init; 8];
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder().iter().fold(init, |a, v| f(a, *v));
        for c in chunks {
            for i in 0..8 {
                acc[i] = f(acc[i], c[i]);
            }
        }
        acc.iter().fold(tail, |a, v| f(a, *v))
    }
    #[inline(always)]
    fn generic(s: &mut [f32], width: usize, scale: f32) {
        for row in s.chunks_exact_mut(width) {
            let max = lanes(row, f32::NEG_INFINITY, |m, v| if v > m { v } else { m }) * scale;
            row.iter_mut().for_each(|v| *v = crate::cpu_exp::exp(*v * scale - max));
            let inv = 1.0 / lanes(row, 0.0, |a, v| a + v);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(s: &mut [f32], width: usize, scale: f32) {
        generic(s, width, scale)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has AVX2.
        return unsafe { avx2(s, width, scale) };
    }
    generic(s, width, scale)
}

/// `t` [cols, rows] = the transpose of `m` [rows, cols].
fn transpose(m: &[f32], rows: usize, cols: usize, t: &mut Vec<f32>) {
    t.resize(rows * cols, 0.0);
    crate::cpu_conv::transpose(m, cols, rows, cols, t);
}

/// P = softmax(q^T k / sqrt(ch)) of unit `u` into `scratch.p` [hw_q, hw_k].
fn weights(s: &Sizes, qkv: &[f32], u: usize, scratch: &mut Scratch) {
    let (hw, ch) = (s.hw, s.ch);
    let [q, k, _] = s.qkv(qkv.as_ptr(), u);
    scratch.p.resize(hw * hw, 0.0);
    // Safety: q and k are [ch, hw] with rows 3 hw apart inside `qkv`; p holds hw x hw.
    unsafe { matmul(hw, hw, ch, (scratch.p.as_mut_ptr(), hw as isize, 1), false, (q, 1, 3 * hw as isize), (k, 3 * hw as isize, 1), false) };
    softmax_rows(&mut scratch.p, hw, 1.0 / (ch as f32).sqrt());
}

fn forward(qkv: &[f32], s: Sizes) -> Vec<f32> {
    let (hw, ch) = (s.hw, s.ch);
    let mut out = uninit(s.units * ch * hw);
    let out_ptr = SharedMut(out.as_mut_ptr().cast());
    (0..s.units).into_par_iter().for_each_init(Scratch::default, |scratch, u| {
        let out_ptr = out_ptr;
        weights(&s, qkv, u, scratch);
        transpose(&scratch.p, hw, hw, &mut scratch.t);
        let [_, _, v] = s.qkv(qkv.as_ptr(), u);
        // out[u] [ch, hw_q] = v [ch, hw_k] * P^T [hw_k, hw_q]; unit u writes only its own rows.
        unsafe { matmul(ch, hw, hw, (out_ptr.0.add(u * ch * hw), hw as isize, 1), false, (v, 3 * hw as isize, 1), (scratch.t.as_ptr(), hw as isize, 1), false) };
    });
    // Safety: each unit writes its [ch, hw] block of the output whole.
    unsafe { assume_init(out) }
}

/// With G = the gradient of q^T k / sqrt(ch) (softmax backward, times the scale):
/// dv = dout P, dq = k G^T, dk = q G; dP = dout^T v.
fn backward(qkv: &[f32], grad: &[f32], s: Sizes) -> Vec<f32> {
    let (hw, ch) = (s.hw, s.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let mut dqkv = uninit(qkv.len());
    let dqkv_ptr = SharedMut(dqkv.as_mut_ptr().cast());
    (0..s.units).into_par_iter().for_each_init(Scratch::default, |scratch, u| {
        let dqkv_ptr = dqkv_ptr;
        weights(&s, qkv, u, scratch);
        let [q, k, v] = s.qkv(qkv.as_ptr(), u);
        let [dq, dk, dv] = s.qkv(dqkv_ptr.0, u).map(|p| p as *mut f32);
        let dout = grad[u * ch * hw..].as_ptr();
        let row = 3 * hw as isize;
        scratch.dp.resize(hw * hw, 0.0);
        // Safety: every pointer stays inside unit u's values; unit u writes only its own.
        unsafe {
            matmul(ch, hw, hw, (dv, row, 1), false, (dout, hw as isize, 1), (scratch.p.as_ptr(), hw as isize, 1), false);
            matmul(hw, hw, ch, (scratch.dp.as_mut_ptr(), hw as isize, 1), false, (dout, 1, hw as isize), (v, row, 1), false);
        }
        // G = P (dP - rowsum(dP P)) * scale, into dp.
        for (p, dp) in scratch.p.chunks_exact(hw).zip(scratch.dp.chunks_exact_mut(hw)) {
            let dot: f32 = p.iter().zip(dp.iter()).map(|(p, d)| p * d).sum();
            p.iter().zip(dp.iter_mut()).for_each(|(p, d)| *d = p * (*d - dot) * scale);
        }
        transpose(&scratch.dp, hw, hw, &mut scratch.t);
        unsafe {
            matmul(ch, hw, hw, (dq, row, 1), false, (k, row, 1), (scratch.t.as_ptr(), hw as isize, 1), false);
            matmul(ch, hw, hw, (dk, row, 1), false, (q, row, 1), (scratch.dp.as_ptr(), hw as isize, 1), false);
        }
    });
    // Safety: each unit writes its q, k and v gradients whole.
    unsafe { assume_init(dqkv) }
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("attention on flex: contiguous float32 tensors")
}

impl AttentionBackend for Flex {
    fn edm_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let qkv = contiguous(&qkv);
        let shape = qkv.layout().shape().clone();
        let s = Sizes::new(&shape, heads);
        let out_shape = Shape::from([shape[0], shape[1] / 3, shape[2], shape[3]]);
        FlexTensor::from_data(TensorData::new(forward(f32s(&qkv), s), out_shape))
    }

    fn edm_attention_backward(qkv: FloatTensor<Self>, grad: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let (qkv, grad) = (contiguous(&qkv), contiguous(&grad));
        let shape = qkv.layout().shape().clone();
        let s = Sizes::new(&shape, heads);
        FlexTensor::from_data(TensorData::new(backward(f32s(&qkv), f32s(&grad), s), shape))
    }
}

#[derive(Debug)]
struct AttentionGrad;

impl<B: Backend + AttentionBackend> Backward<B, 1> for AttentionGrad {
    type State = (NodeId, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_qkv] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (qkv_state, heads) = ops.state;
        let qkv = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(qkv_state);
        if let Some(node) = node_qkv {
            grads.register::<B>(node.id, B::edm_attention_backward(qkv, grad, heads));
        }
    }
}

impl<B: Backend + AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn edm_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        match AttentionGrad.prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&qkv), heads);
                let out = B::edm_attention(qkv.into_parts().0, heads);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::edm_attention(qkv.into_parts().0, heads)),
        }
    }

    fn edm_attention_backward(_: FloatTensor<Self>, _: FloatTensor<Self>, _: usize) -> FloatTensor<Self> {
        unreachable!("edm_attention_backward runs on the inner backend (no second-order gradients)")
    }
}

/// Attention through `AttentionBackend` (differentiable; float32, on flex or CubeCL).
pub fn attention(qkv: Tensor<4>, heads: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as AttentionBackend>::edm_attention(qkv.into_dispatch(), heads))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..len as u64).map(|i| scale * (((i.wrapping_mul(2654435761).wrapping_add(seed * 40503) % 65536) as f32 / 65536.0) - 0.5)).collect()
    }

    /// Output and the gradient of sum(grad * out) for `qkv`, by definition in f64.
    fn direct(qkv: &[f32], grad: &[f32], s: Sizes) -> (Vec<f64>, Vec<f64>) {
        let (hw, ch) = (s.hw, s.ch);
        let scale = 1.0 / (ch as f64).sqrt();
        let (mut out, mut dqkv) = (vec![0.0; s.units * ch * hw], vec![0.0; qkv.len()]);
        for u in 0..s.units {
            let at = |part: usize, c: usize, i: usize| u * 3 * ch * hw + c * 3 * hw + part * hw + i;
            let x = |part, c, i| qkv[at(part, c, i)] as f64;
            let mut p = vec![vec![0.0; hw]; hw];
            for i in 0..hw {
                let logits: Vec<f64> = (0..hw).map(|j| (0..ch).map(|c| x(0, c, i) * x(1, c, j)).sum::<f64>() * scale).collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                p[i] = logits.iter().map(|l| (l - max).exp() / total).collect();
            }
            let g = |c: usize, i: usize| grad[u * ch * hw + c * hw + i] as f64;
            for c in 0..ch {
                for i in 0..hw {
                    out[u * ch * hw + c * hw + i] = (0..hw).map(|j| x(2, c, j) * p[i][j]).sum();
                }
            }
            for i in 0..hw {
                let dp: Vec<f64> = (0..hw).map(|j| (0..ch).map(|c| g(c, i) * x(2, c, j)).sum()).collect();
                let dot: f64 = (0..hw).map(|j| dp[j] * p[i][j]).sum();
                for j in 0..hw {
                    let ds = p[i][j] * (dp[j] - dot) * scale;
                    for c in 0..ch {
                        dqkv[at(0, c, i)] += ds * x(1, c, j);
                        dqkv[at(1, c, j)] += ds * x(0, c, i);
                        dqkv[at(2, c, j)] += g(c, i) * p[i][j];
                    }
                }
            }
        }
        (out, dqkv)
    }

    fn rel_error(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        (num / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
    }

    #[test]
    fn attention_and_its_gradient_match_the_definition() {
        // (n, heads, ch, hw): one head as adm_tiny; two heads; large logits (scale 8: a
        // peaked softmax); a non-square position count.
        for (n, heads, ch, hw, spread) in [(2, 1, 8, 16, 2.0), (2, 2, 4, 9, 2.0), (1, 1, 16, 25, 8.0), (3, 1, 5, 6, 1.0)] {
            let s = Sizes { units: n * heads, ch, hw };
            let qkv = values(n * heads * 3 * ch * hw, 1, spread);
            let grad = values(n * heads * ch * hw, 2, 1.0);
            let (out, dqkv) = direct(&qkv, &grad, s);
            let errors = [rel_error(&forward(&qkv, s), &out), rel_error(&backward(&qkv, &grad, s), &dqkv)];
            assert!(errors.iter().all(|e| *e < 1e-5), "{s:?}: relative errors (output, qkv gradient) {errors:?}");
        }
    }
}
