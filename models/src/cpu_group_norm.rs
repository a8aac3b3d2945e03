//! Group normalisation as one operation with its own backward, for Burn's flex CPU backend.
//!
//! `nn::GroupNorm` written with Burn's tensor ops is about a dozen passes forward (reductions,
//! centring, squares, broadcasts) and twice as many backward, most single-threaded at these
//! sizes. Here each (sample, group) is one multi-threaded work unit that reads its values
//! twice forward (statistics, then the normalised output) and three times backward. The
//! statistics are recomputed in the backward pass rather than kept.
//!
//! `nn::GroupNorm` sends float32 flex tensors here; other backends and dtypes keep the
//! composite (calling this on another backend panics: it is registered for flex only).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::cpu_conv::{assume_init, uninit};
use rayon::prelude::*;

/// Group norm of `x` [N, C, ...] over `groups` groups of channels, then `weight` [C] and `bias`
/// [C] per channel: (x - mean) / sqrt(var + eps) * weight + bias, var biased (as PyTorch's).
#[backend_extension(Flex, Autodiff)]
pub trait GroupNormBackend: Backend {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64) -> FloatTensor<Self>;

    /// The gradients for `x`, `weight` and `bias` given the output's gradient `grad`.
    fn group_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("group_norm on flex: contiguous float32 tensors")
}

fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

impl GroupNormBackend for Flex {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64) -> FloatTensor<Self> {
        let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.to_contiguous());
        let shape = x.layout().shape().clone();
        let y = forward(f32s(&x), f32s(&weight), f32s(&bias), Sizes::new(&shape, groups), eps as f32);
        tensor(y, shape)
    }

    fn group_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, groups: usize, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (x, weight, grad) = (x.to_contiguous(), weight.to_contiguous(), grad.to_contiguous());
        let shape = x.layout().shape().clone();
        let sizes = Sizes::new(&shape, groups);
        let (dx, dw, db) = backward(f32s(&x), f32s(&weight), f32s(&grad), sizes, eps as f32);
        (tensor(dx, shape), tensor(dw, Shape::from([sizes.c])), tensor(db, Shape::from([sizes.c])))
    }
}

/// N samples, C channels in `groups` groups, `hw` values per channel.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    n: usize,
    c: usize,
    groups: usize,
    hw: usize,
}

impl Sizes {
    fn new(shape: &Shape, groups: usize) -> Self {
        let (n, c) = (shape[0], shape[1]);
        assert!(groups > 0 && c % groups == 0, "group_norm: {c} channels do not split into {groups} groups");
        Self { n, c, groups, hw: shape.num_elements() / (n * c).max(1) }
    }

    /// Values of one (sample, group) unit: its channels are adjacent, so the unit is contiguous.
    fn unit_len(&self) -> usize {
        self.c / self.groups * self.hw
    }
}

/// The sum of `f(x[i], y[i])` in eight interleaved lanes (vectorises; a fixed order, so
/// deterministic).
fn lane_sum(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (xs, ys) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(a, b)| f(*a, *b)).sum();
    for (xc, yc) in xs.zip(ys) {
        for i in 0..8 {
            lanes[i] += f(xc[i], yc[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A unit's mean and 1 / sqrt(var + eps), by two passes.
fn statistics(unit: &[f32], eps: f32) -> (f32, f32) {
    let len = unit.len() as f32;
    let mean = lane_sum(unit, unit, |v, _| v) / len;
    let var = lane_sum(unit, unit, |v, _| (v - mean) * (v - mean)) / len;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward(x: &[f32], weight: &[f32], bias: &[f32], s: Sizes, eps: f32) -> Vec<f32> {
    let (len, per_group) = (s.unit_len(), s.c / s.groups);
    let mut y = uninit(x.len());
    y.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(unit, (y, x))| {
        let (mean, inv_std) = statistics(x, eps);
        let first_channel = unit % s.groups * per_group;
        for (k, (y, x)) in y.chunks_exact_mut(s.hw).zip(x.chunks_exact(s.hw)).enumerate() {
            // The affine weight folded into the scale: one multiply-add per value.
            let scale = inv_std * weight[first_channel + k];
            let shift = bias[first_channel + k] - mean * scale;
            y.iter_mut().zip(x).for_each(|(y, x)| {
                y.write(x * scale + shift);
            });
        }
    });
    // Safety: every unit writes all its values.
    unsafe { assume_init(y) }
}

/// (dx, dweight, dbias). Per unit, with x^ = (x - mean) / std and g = grad * weight:
/// dx = (g - mean(g) - x^ mean(g x^)) / std; dweight and dbias sum grad x^ and grad per
/// channel, first per sample, then over the samples in order.
fn backward(x: &[f32], weight: &[f32], grad: &[f32], s: Sizes, eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (len, per_group) = (s.unit_len(), s.c / s.groups);
    let mut dx = uninit(x.len());
    // Per (sample, channel): sum of grad * x^, sum of grad.
    let mut channel_sums = vec![[0.0f32; 2]; s.n * s.c];
    dx.par_chunks_mut(len)
        .zip(channel_sums.par_chunks_mut(per_group))
        .zip(x.par_chunks(len).zip(grad.par_chunks(len)))
        .enumerate()
        .for_each(|(unit, ((dx, sums), (x, grad)))| {
            let (mean, inv_std) = statistics(x, eps);
            let first_channel = unit % s.groups * per_group;
            let (mut sum_g, mut sum_g_xhat) = (0.0f32, 0.0f32);
            for (k, (x, grad)) in x.chunks_exact(s.hw).zip(grad.chunks_exact(s.hw)).enumerate() {
                let dy_sum = lane_sum(grad, grad, |g, _| g);
                let dy_xhat_sum = lane_sum(x, grad, |x, g| (x - mean) * inv_std * g);
                sums[k] = [dy_xhat_sum, dy_sum];
                let w = weight[first_channel + k];
                sum_g += w * dy_sum;
                sum_g_xhat += w * dy_xhat_sum;
            }
            let (mean_g, mean_g_xhat) = (sum_g / len as f32, sum_g_xhat / len as f32);
            for (k, (dx, (x, grad))) in dx.chunks_exact_mut(s.hw).zip(x.chunks_exact(s.hw).zip(grad.chunks_exact(s.hw))).enumerate() {
                let w = weight[first_channel + k];
                for ((dx, x), g) in dx.iter_mut().zip(x).zip(grad) {
                    let xhat = (x - mean) * inv_std;
                    dx.write((g * w - mean_g - xhat * mean_g_xhat) * inv_std);
                }
            }
        });
    let (mut dw, mut db) = (vec![0.0f32; s.c], vec![0.0f32; s.c]);
    for sample in channel_sums.chunks_exact(s.c) {
        for (c, [gx, g]) in sample.iter().enumerate() {
            dw[c] += gx;
            db[c] += g;
        }
    }
    // Safety: every unit writes all its values.
    (unsafe { assume_init(dx) }, dw, db)
}

#[derive(Debug)]
struct GroupNormGrad;

impl<B: Backend + GroupNormBackend> Backward<B, 3> for GroupNormGrad {
    type State = (NodeId, NodeId, usize, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, groups, eps) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
        let (dx, dw, db) = B::group_norm_backward(x, weight, grad, groups, eps);
        for (node, g) in [(node_x, dx), (node_weight, dw), (node_bias, db)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: Backend + GroupNormBackend, C: CheckpointStrategy> GroupNormBackend for Autodiff<B, C> {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64) -> FloatTensor<Self> {
        match GroupNormGrad.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), groups, eps);
                let out = B::group_norm(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, groups, eps);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::group_norm(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, groups, eps)),
        }
    }

    fn group_norm_backward(_: FloatTensor<Self>, _: FloatTensor<Self>, _: FloatTensor<Self>, _: usize, _: f64) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("group_norm_backward runs on the inner backend (no second-order gradients)")
    }
}

/// Group norm through `GroupNormBackend` (differentiable; flex, float32).
pub fn group_norm(x: Tensor<4>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as GroupNormBackend>::group_norm(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), groups, eps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
        (0..len as u64).map(|i| offset + scale * (((i.wrapping_mul(2654435761).wrapping_add(seed * 40503) % 65536) as f32 / 65536.0) - 0.5)).collect()
    }

    /// Group norm and its gradients by definition, in f64 (the gradient of sum(grad * y)
    /// written out per unit).
    fn direct(x: &[f32], w: &[f32], b: &[f32], dy: &[f32], s: Sizes, eps: f64) -> [Vec<f64>; 4] {
        let (len, per_group) = (s.unit_len(), s.c / s.groups);
        let (mut y, mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; s.c], vec![0.0; s.c]);
        for unit in 0..s.n * s.groups {
            let r = unit * len..(unit + 1) * len;
            let mean = x[r.clone()].iter().map(|v| *v as f64).sum::<f64>() / len as f64;
            let var = x[r.clone()].iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            let inv_std = 1.0 / (var + eps).sqrt();
            let channel = |i: usize| unit % s.groups * per_group + (i - r.start) / s.hw;
            let xhat = |i: usize| (x[i] as f64 - mean) * inv_std;
            let g = |i: usize| dy[i] as f64 * w[channel(i)] as f64;
            let mean_g = r.clone().map(g).sum::<f64>() / len as f64;
            let mean_g_xhat = r.clone().map(|i| g(i) * xhat(i)).sum::<f64>() / len as f64;
            for i in r.clone() {
                y[i] = xhat(i) * w[channel(i)] as f64 + b[channel(i)] as f64;
                dx[i] = (g(i) - mean_g - xhat(i) * mean_g_xhat) * inv_std;
                dw[channel(i)] += dy[i] as f64 * xhat(i);
                db[channel(i)] += dy[i] as f64;
            }
        }
        [y, dx, dw, db]
    }

    fn rel_error(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        (num / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
    }

    #[test]
    fn group_norm_and_its_gradients_match_the_definition() {
        // (n, c, groups, hw): EDM's 32 channels in 8 groups; one group; two values per group;
        // an offset mean (catches one-pass variance).
        for (n, c, groups, hw, offset) in [(3, 32, 8, 7 * 5, 0.0), (2, 6, 1, 16, 0.0), (4, 6, 3, 3, 0.0), (2, 8, 4, 64, 100.0)] {
            let s = Sizes { n, c, groups, hw };
            let x = values(n * c * hw, 1, 4.0, offset);
            let (w, b, dy) = (values(c, 2, 1.0, 1.0), values(c, 3, 1.0, 0.0), values(n * c * hw, 4, 2.0, 0.0));
            let eps = 1e-5;
            let [y, dx, dw, db] = direct(&x, &w, &b, &dy, s, eps);
            let (got_dx, got_dw, got_db) = backward(&x, &w, &dy, s, eps as f32);
            let errors = [rel_error(&forward(&x, &w, &b, s, eps as f32), &y), rel_error(&got_dx, &dx), rel_error(&got_dw, &dw), rel_error(&got_db, &db)];
 assert!(errors.iter().all(|e| *e < 2e-5), "{s:?} offset {offset}: relative errors (y, dx, dweight, dbias) {errors:?}");
        }
    }
}
