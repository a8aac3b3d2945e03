//! Group normalisation, optionally followed by SiLU, as one operation with its own backward,
//! for Burn's flex CPU backend.
//!
//! `nn::GroupNorm` written with Burn's tensor ops is about a dozen passes forward (reductions,
//! centring, squares, broadcasts) and twice as many backward, most single-threaded at these
//! sizes. Here each (sample, group) is one multi-threaded work unit that reads its values
//! twice forward (statistics, then the output) and three times backward. The statistics are
//! recomputed in the backward pass rather than kept.
//!
//! The norm's affine weight and bias [C] and, optionally, EDM's adaptive modulation (a
//! per-sample scale and shift from the noise embedding, [N, 2C]) are inputs of the operation:
//! a UNet block's `silu(shift + norm(x) * (1 + scale))` is this one operation each way
//! instead of five full-size passes (norm, multiply, add, SiLU, and the sums over pixels that
//! the broadcast scale and shift need backward) plus the small tensor ops that combine the
//! norm's weights with the modulation, each a kernel launch on a GPU. The kernels work with
//! the per-sample affine a = weight (1 + scale), b = bias (1 + scale) + shift ([N, C]); the
//! gradients for the weights and the modulation follow from those of a and b.
//!
//! `nn::GroupNorm` sends float32 flex tensors here, and CubeCL (CUDA) tensors to the same
//! operation's CubeCL kernels (`cube_group_norm`, in float32); other backends keep the
//! composite (calling this on another backend panics: it is registered for those two only).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::cpu_conv::{assume_init, contiguous, lane_sum, uninit};
use crate::cpu_silu::kernels;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Group norm of `x` [N, C, ...] over `groups` groups of channels with the affine `weight` and
/// `bias` [C]: z = (x - mean) / sqrt(var + eps) * weight + bias, var biased (as PyTorch's).
/// The output is z, or silu(z) where `silu`. The `_modulated` forms take EDM's adaptive
/// `modulation` [N, 2C], a per-sample scale and shift (in that order, as EDM's
/// `params.chunk(2)`), and compute z = x^ weight (1 + scale) + bias (1 + scale) + shift: the
/// norm with its affine, then EDM's `shift + norm * (scale + 1)`.
// CubeCL: `cube_group_norm` (see models/build.rs for `cube_kernels`).
#[backend_extension(Flex, Cube: cfg(cube_kernels), Autodiff)]
pub trait GroupNormBackend: Backend {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64, silu: bool) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn group_norm_modulated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        modulation: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// The gradients for `x`, `weight` and `bias` given the output's gradient `grad`.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients for `x`, `weight`, `bias` and `modulation`.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_modulated_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        modulation: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("group_norm on flex: contiguous float32 tensors")
}

fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// The per-sample affine (a, b), [N, C] each: a = weight (1 + scale), b = bias (1 + scale) +
/// shift, with (scale | shift) the rows of `modulation` [N, 2C]; without it, the weight and
/// bias for every sample.
fn per_sample_affine(weight: &[f32], bias: &[f32], modulation: Option<&[f32]>, n: usize) -> (Vec<f32>, Vec<f32>) {
    let c = weight.len();
    let (mut a, mut b) = (Vec::with_capacity(n * c), Vec::with_capacity(n * c));
    for sample in 0..n {
        for k in 0..c {
            match modulation {
                Some(m) => {
                    let factor = m[sample * 2 * c + k] + 1.0;
                    a.push(weight[k] * factor);
                    b.push(bias[k] * factor + m[sample * 2 * c + c + k]);
                }
                None => {
                    a.push(weight[k]);
                    b.push(bias[k]);
                }
            }
        }
    }
    (a, b)
}

/// (dweight [C], dbias [C], dmodulation [N, 2C] where modulated) from the gradients `da`, `db`
/// [N, C] of the per-sample affine (see [`per_sample_affine`]).
fn affine_gradients(da: &[f32], db: &[f32], weight: &[f32], bias: &[f32], modulation: Option<&[f32]>) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let c = weight.len();
    let n = da.len() / c.max(1);
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    let mut dmodulation = modulation.map(|_| vec![0.0f32; n * 2 * c]);
    for sample in 0..n {
        for k in 0..c {
            let (ga, gb) = (da[sample * c + k], db[sample * c + k]);
            let factor = modulation.map_or(1.0, |m| m[sample * 2 * c + k] + 1.0);
            dweight[k] += ga * factor;
            dbias[k] += gb * factor;
            if let Some(dm) = dmodulation.as_mut() {
                dm[sample * 2 * c + k] = ga * weight[k] + gb * bias[k];
                dm[sample * 2 * c + c + k] = gb;
            }
        }
    }
    (dweight, dbias, dmodulation)
}

/// The flex operation, with or without modulation.
fn flex_forward(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, modulation: Option<FlexTensor>, groups: usize, eps: f64, silu: bool) -> FlexTensor {
    let (x, weight, bias, modulation) = (contiguous(&x), contiguous(&weight), contiguous(&bias), modulation.map(|m| contiguous(&m)));
    let shape = x.layout().shape().clone();
    let sizes = Sizes::new(&shape, groups);
    let (a, b) = per_sample_affine(f32s(&weight), f32s(&bias), modulation.as_ref().map(f32s), sizes.n);
    tensor(forward(f32s(&x), &a, &b, sizes, eps as f32, silu), shape)
}

/// (dx, dweight, dbias, dmodulation where modulated) on flex.
#[allow(clippy::too_many_arguments)]
fn flex_backward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    modulation: Option<FlexTensor>,
    grad: FlexTensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> (FlexTensor, FlexTensor, FlexTensor, Option<FlexTensor>) {
    let (x, weight, bias, grad) = (contiguous(&x), contiguous(&weight), contiguous(&bias), contiguous(&grad));
    let modulation = modulation.map(|m| contiguous(&m));
    let shape = x.layout().shape().clone();
    let sizes = Sizes::new(&shape, groups);
    let (weight, bias, modulation) = (f32s(&weight), f32s(&bias), modulation.as_ref().map(f32s));
    let (a, b) = per_sample_affine(weight, bias, modulation, sizes.n);
    let (dx, da, db) = backward(f32s(&x), &a, &b, f32s(&grad), sizes, eps as f32, silu);
    let (dweight, dbias, dmodulation) = affine_gradients(&da, &db, weight, bias, modulation);
    let c = Shape::from([sizes.c]);
    (tensor(dx, shape), tensor(dweight, c.clone()), tensor(dbias, c), dmodulation.map(|dm| tensor(dm, Shape::from([sizes.n, 2 * sizes.c]))))
}

impl GroupNormBackend for Flex {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64, silu: bool) -> FloatTensor<Self> {
        flex_forward(x, weight, bias, None, groups, eps, silu)
    }

    fn group_norm_modulated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        modulation: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        flex_forward(x, weight, bias, Some(modulation), groups, eps, silu)
    }

    fn group_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dweight, dbias, _) = flex_backward(x, weight, bias, None, grad, groups, eps, silu);
        (dx, dweight, dbias)
    }

    fn group_norm_modulated_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        modulation: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dweight, dbias, dmodulation) = flex_backward(x, weight, bias, Some(modulation), grad, groups, eps, silu);
        (dx, dweight, dbias, dmodulation.expect("modulated backward gives the modulation's gradient"))
    }
}

/// N samples, C channels in `groups` groups, `hw` values per channel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    pub(crate) n: usize,
    pub(crate) c: usize,
    groups: usize,
    pub(crate) hw: usize,
}

impl Sizes {
    pub(crate) fn new(shape: &Shape, groups: usize) -> Self {
        let (n, c) = (shape[0], shape[1]);
        assert!(groups > 0 && c % groups == 0, "group_norm: {c} channels do not split into {groups} groups");
        Self { n, c, groups, hw: shape.num_elements() / (n * c).max(1) }
    }

    /// Values of one (sample, group) unit: its channels are adjacent, so the unit is contiguous.
    fn unit_len(&self) -> usize {
        self.c / self.groups * self.hw
    }

    /// The [N, C] index of unit `unit`'s first channel (units are sample-major).
    fn first_channel(&self, unit: usize) -> usize {
        unit / self.groups * self.c + unit % self.groups * (self.c / self.groups)
    }
}

/// A unit's mean and 1 / sqrt(var + eps), by two passes.
#[inline(always)]
fn statistics(unit: &[f32], eps: f32) -> (f32, f32) {
    let len = unit.len() as f32;
    let mean = lane_sum(unit, unit, |v, _| v) / len;
    let var = lane_sum(unit, unit, |v, _| (v - mean) * (v - mean)) / len;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Runs `f(z, i)` on z = x * a + b, 256 values at a time from offset `i`: SiLU's vectorised
/// kernels read z from a buffer on the stack instead of a full-size temporary.
#[inline(always)]
fn with_affine(x: &[f32], a: f32, b: f32, mut f: impl FnMut(&[f32], usize)) {
    let mut z = [0.0f32; 256];
    for (i, x) in x.chunks(z.len()).enumerate() {
        let z = &mut z[..x.len()];
        z.iter_mut().zip(x).for_each(|(z, x)| *z = x * a + b);
        f(z, i * 256);
    }
}

/// The norm with the per-sample affine `scale`, `shift` [N, C] (a and b of
/// [`per_sample_affine`]), then SiLU where `silu`.
fn forward(x: &[f32], scale: &[f32], shift: &[f32], s: Sizes, eps: f32, silu: bool) -> Vec<f32> {
    let len = s.unit_len();
    let mut y = uninit(x.len());
    y.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(unit, (y, x))| {
        let first = s.first_channel(unit);
        forward_unit(&Unit { x, scale: &scale[first..], shift: &shift[first..], hw: s.hw, eps, silu }, y);
    });
    // Safety: every unit writes all its values.
    unsafe { assume_init(y) }
}

/// One (sample, group) unit's values and its channels' scales and shifts (from its first).
struct Unit<'a> {
    x: &'a [f32],
    scale: &'a [f32],
    shift: &'a [f32],
    hw: usize,
    eps: f32,
    silu: bool,
}

/// `forward_unit_body` compiled for AVX2 where the CPU has it (its passes over the unit are
/// vector loops: 8 lanes at once instead of SSE2's 4; the backward pass ran 1.6-2.4x faster),
/// else for the baseline. No fused multiply-adds either way, so both give the same bits.
fn forward_unit(u: &Unit<'_>, y: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(u: &Unit<'_>, y: &mut [MaybeUninit<f32>]) {
            forward_unit_body(u, y)
        }
        // Safety: the CPU has AVX2.
        return unsafe { avx2(u, y) };
    }
    forward_unit_body(u, y)
}

#[inline(always)]
fn forward_unit_body(u: &Unit<'_>, y: &mut [MaybeUninit<f32>]) {
    let (mean, inv_std) = statistics(u.x, u.eps);
    for (k, (y, x)) in y.chunks_exact_mut(u.hw).zip(u.x.chunks_exact(u.hw)).enumerate() {
        // The normalisation folded into the affine: one multiply-add per value.
        let a = inv_std * u.scale[k];
        let b = u.shift[k] - mean * a;
        if u.silu {
            with_affine(x, a, b, |z, i| kernels::silu(z, &mut y[i..i + z.len()]));
        } else {
            y.iter_mut().zip(x).for_each(|(y, x)| {
                y.write(x * a + b);
            });
        }
    }
}

/// (dx, dscale, dshift). Per unit, with x^ = (x - mean) / std, dz the gradient at z (grad,
/// or grad * silu'(z)) and g = dz * scale: dx = (g - mean(g) - x^ mean(g x^)) / std; dscale
/// and dshift are the sums of dz x^ and dz over each (sample, channel).
#[allow(clippy::too_many_arguments)]
fn backward(x: &[f32], scale: &[f32], shift: &[f32], grad: &[f32], s: Sizes, eps: f32, silu: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (len, per_group) = (s.unit_len(), s.c / s.groups);
    let mut dx = uninit(x.len());
    // Per (sample, channel): sum of dz * x^, sum of dz.
    let mut channel_sums = vec![[0.0f32; 2]; s.n * s.c];
    dx.par_chunks_mut(len)
        .zip(channel_sums.par_chunks_mut(per_group))
        .zip(x.par_chunks(len).zip(grad.par_chunks(len)))
        .enumerate()
        .for_each(|(unit, ((dx, sums), (x, grad)))| {
            let first = s.first_channel(unit);
            backward_unit(&Unit { x, scale: &scale[first..], shift: &shift[first..], hw: s.hw, eps, silu }, grad, dx, sums);
        });
    let (dscale, dshift) = channel_sums.into_iter().map(|[gx, g]| (gx, g)).unzip();
    // Safety: every unit writes all its values.
    (unsafe { assume_init(dx) }, dscale, dshift)
}

/// `backward_unit_body` for AVX2 where the CPU has it, as `forward_unit`.
fn backward_unit(u: &Unit<'_>, grad: &[f32], dx: &mut [MaybeUninit<f32>], sums: &mut [[f32; 2]]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(u: &Unit<'_>, grad: &[f32], dx: &mut [MaybeUninit<f32>], sums: &mut [[f32; 2]]) {
            backward_unit_body(u, grad, dx, sums)
        }
        // Safety: the CPU has AVX2.
        return unsafe { avx2(u, grad, dx, sums) };
    }
    backward_unit_body(u, grad, dx, sums)
}

/// One unit's dx, and its channels' sums of dz x^ and dz into `sums`.
#[inline(always)]
fn backward_unit_body(u: &Unit<'_>, grad: &[f32], dx: &mut [MaybeUninit<f32>], sums: &mut [[f32; 2]]) {
    let (mean, inv_std) = statistics(u.x, u.eps);
    let len = u.x.len();
    let (mut sum_g, mut sum_g_xhat) = (0.0f32, 0.0f32);
    for (k, ((x, grad), dx)) in u.x.chunks_exact(u.hw).zip(grad.chunks_exact(u.hw)).zip(dx.chunks_exact_mut(u.hw)).enumerate() {
        let dz: &[f32] = if u.silu {
            // dz goes into dx's values for now; the pass below turns it into dx.
            let a = inv_std * u.scale[k];
            with_affine(x, a, u.shift[k] - mean * a, |z, i| kernels::silu_backward(z, &grad[i..i + z.len()], &mut dx[i..i + z.len()]));
            // Safety: silu_backward wrote every value.
            unsafe { &*(dx as *const [MaybeUninit<f32>] as *const [f32]) }
        } else {
            grad
        };
        let dz_sum = lane_sum(dz, dz, |g, _| g);
        let dz_xhat_sum = lane_sum(x, dz, |x, g| (x - mean) * inv_std * g);
        sums[k] = [dz_xhat_sum, dz_sum];
        sum_g += u.scale[k] * dz_sum;
        sum_g_xhat += u.scale[k] * dz_xhat_sum;
    }
    let (mean_g, mean_g_xhat) = (sum_g / len as f32, sum_g_xhat / len as f32);
    for (k, ((dx, x), grad)) in dx.chunks_exact_mut(u.hw).zip(u.x.chunks_exact(u.hw)).zip(grad.chunks_exact(u.hw)).enumerate() {
        let a = u.scale[k];
        for ((dx, x), g) in dx.iter_mut().zip(x).zip(grad) {
            // Safety: with SiLU, the loop above wrote dz into every value of dx.
            let dz = if u.silu { unsafe { dx.assume_init_read() } } else { *g };
            let xhat = (x - mean) * inv_std;
            dx.write((dz * a - mean_g - xhat * mean_g_xhat) * inv_std);
        }
    }
}

/// The backward pass of the unmodulated operation (parents x, weight, bias).
#[derive(Debug)]
struct GroupNormGrad;

/// The backward pass of the modulated operation (parents x, weight, bias, modulation).
#[derive(Debug)]
struct GroupNormModulatedGrad;

/// The settings every backward pass needs besides its inputs.
type Settings = (usize, f64, bool);

impl<B: Backend + GroupNormBackend> Backward<B, 3> for GroupNormGrad {
    type State = ([NodeId; 3], Settings);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (inputs, (groups, eps, silu)) = ops.state;
        let [x, weight, bias] = inputs.map(|id| checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(id));
        let (dx, dweight, dbias) = B::group_norm_backward(x, weight, bias, grad, groups, eps, silu);
        for (node, g) in ops.parents.into_iter().zip([dx, dweight, dbias]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: Backend + GroupNormBackend> Backward<B, 4> for GroupNormModulatedGrad {
    type State = ([NodeId; 4], Settings);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (inputs, (groups, eps, silu)) = ops.state;
        let [x, weight, bias, modulation] = inputs.map(|id| checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(id));
        let (dx, dweight, dbias, dmodulation) = B::group_norm_modulated_backward(x, weight, bias, modulation, grad, groups, eps, silu);
        for (node, g) in ops.parents.into_iter().zip([dx, dweight, dbias, dmodulation]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: Backend + GroupNormBackend, C: CheckpointStrategy> GroupNormBackend for Autodiff<B, C> {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64, silu: bool) -> FloatTensor<Self> {
        match GroupNormGrad.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = ([prep.checkpoint(&x), prep.checkpoint(&weight), prep.checkpoint(&bias)], (groups, eps, silu));
                prep.finish(state, B::group_norm(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, groups, eps, silu))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::group_norm(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, groups, eps, silu)),
        }
    }

    fn group_norm_modulated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        modulation: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let run = |x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, modulation: FloatTensor<Self>| {
            B::group_norm_modulated(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, modulation.into_parts().0, groups, eps, silu)
        };
        match GroupNormModulatedGrad.prepare::<C>([x.node(), weight.node(), bias.node(), modulation.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let inputs = [prep.checkpoint(&x), prep.checkpoint(&weight), prep.checkpoint(&bias), prep.checkpoint(&modulation)];
                prep.finish((inputs, (groups, eps, silu)), run(x, weight, bias, modulation))
            }
            OpsKind::UnTracked(prep) => prep.finish(run(x, weight, bias, modulation)),
        }
    }

    fn group_norm_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: usize,
        _: f64,
        _: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("group_norm_backward runs on the inner backend (no second-order gradients)")
    }

    fn group_norm_modulated_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: usize,
        _: f64,
        _: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("group_norm_modulated_backward runs on the inner backend (no second-order gradients)")
    }
}

/// Group norm of `x` [N, C, H, W] with the affine `weight`, `bias` [C] and, where given, EDM's
/// adaptive `modulation` [N, 2C] (scale | shift), then SiLU where `silu`, through
/// `GroupNormBackend` (differentiable; float32, on flex or CubeCL).
pub fn group_norm(x: Tensor<4>, weight: Tensor<1>, bias: Tensor<1>, modulation: Option<Tensor<2>>, groups: usize, eps: f64, silu: bool) -> Tensor<4> {
    let (x, weight, bias) = (x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(match modulation {
        Some(m) => <Dispatch as GroupNormBackend>::group_norm_modulated(x, weight, bias, m.into_dispatch(), groups, eps, silu),
        None => <Dispatch as GroupNormBackend>::group_norm(x, weight, bias, groups, eps, silu),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn values(len: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
        (0..len as u64).map(|i| offset + scale * (((i.wrapping_mul(2654435761).wrapping_add(seed * 40503) % 65536) as f32 / 65536.0) - 0.5)).collect()
    }

    /// Group norm (and SiLU) and its gradients by definition, in f64 (the gradient of
    /// sum(grad * y) written out per unit).
    fn direct(x: &[f32], scale: &[f32], shift: &[f32], dy: &[f32], s: Sizes, eps: f64, silu: bool) -> [Vec<f64>; 4] {
        let len = s.unit_len();
        let (mut y, mut dx, mut dscale, mut dshift) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; s.n * s.c], vec![0.0; s.n * s.c]);
        for unit in 0..s.n * s.groups {
            let r = unit * len..(unit + 1) * len;
            let mean = x[r.clone()].iter().map(|v| *v as f64).sum::<f64>() / len as f64;
            let var = x[r.clone()].iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            let inv_std = 1.0 / (var + eps).sqrt();
            let channel = |i: usize| s.first_channel(unit) + (i - r.start) / s.hw;
            let xhat = |i: usize| (x[i] as f64 - mean) * inv_std;
            let z = |i: usize| xhat(i) * scale[channel(i)] as f64 + shift[channel(i)] as f64;
            let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
            let dz = |i: usize| match silu {
                true => dy[i] as f64 * sigmoid(z(i)) * (1.0 + z(i) * (1.0 - sigmoid(z(i)))),
                false => dy[i] as f64,
            };
            let g = |i: usize| dz(i) * scale[channel(i)] as f64;
            let mean_g = r.clone().map(g).sum::<f64>() / len as f64;
            let mean_g_xhat = r.clone().map(|i| g(i) * xhat(i)).sum::<f64>() / len as f64;
            for i in r.clone() {
                y[i] = if silu { z(i) * sigmoid(z(i)) } else { z(i) };
                dx[i] = (g(i) - mean_g - xhat(i) * mean_g_xhat) * inv_std;
                dscale[channel(i)] += dz(i) * xhat(i);
                dshift[channel(i)] += dz(i);
            }
        }
        [y, dx, dscale, dshift]
    }

    pub(crate) fn rel_error(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        (num / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
    }

    #[test]
    fn group_norm_and_its_gradients_match_the_definition() {
        // (n, c, groups, hw): EDM's 32 channels in 8 groups; one group; two values per group;
        // an offset mean (catches one-pass variance); a channel longer than SiLU's 256-value
        // blocks. Each with and without SiLU.
        let cases = [(3, 32, 8, 7 * 5, 0.0), (2, 6, 1, 16, 0.0), (4, 6, 3, 3, 0.0), (2, 8, 4, 64, 100.0), (2, 4, 2, 600, 0.0)];
        for ((n, c, groups, hw, offset), silu) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
            let s = Sizes { n, c, groups, hw };
            let x = values(n * c * hw, 1, 4.0, offset);
            let (scale, shift, dy) = (values(n * c, 2, 1.0, 1.0), values(n * c, 3, 1.0, 0.0), values(n * c * hw, 4, 2.0, 0.0));
            let eps = 1e-5;
            let [y, dx, dscale, dshift] = direct(&x, &scale, &shift, &dy, s, eps, silu);
            let (got_dx, got_dscale, got_dshift) = backward(&x, &scale, &shift, &dy, s, eps as f32, silu);
            let got_y = forward(&x, &scale, &shift, s, eps as f32, silu);
            let errors = [rel_error(&got_y, &y), rel_error(&got_dx, &dx), rel_error(&got_dscale, &dscale), rel_error(&got_dshift, &dshift)];
            assert!(errors.iter().all(|e| *e < 2e-5), "{s:?} offset {offset} silu {silu}: relative errors (y, dx, dscale, dshift) {errors:?}");
        }
    }

    /// Through autodiff on flex, the operation's output and gradients for x, the weight and
    /// bias [C] and EDM's modulation [N, 2C], against the definition (in f64) with the
    /// per-sample affine a = weight (1 + scale), b = bias (1 + scale) + shift, and the chain rule
    /// from a and b back to the weights and the modulation.
    #[test]
    fn the_weights_and_the_modulation_get_their_gradients() {
        use burn::tensor::Device;
        let (n, c, groups, h, w) = (3, 8, 4, 5, 3);
        let s = Sizes { n, c, groups, hw: h * w };
        let (x, dy) = (values(n * c * h * w, 1, 4.0, 0.5), values(n * c * h * w, 4, 2.0, 0.0));
        let (weight, bias, modulation) = (values(c, 5, 1.0, 1.0), values(c, 6, 1.0, 0.0), values(n * 2 * c, 7, 1.0, 0.0));
        let eps = 1e-5;
        for (modulated, silu) in [(false, false), (false, true), (true, false), (true, true)] {
            let scale = |i: usize| if modulated { modulation[i / c * 2 * c + i % c] } else { 0.0 };
            let shift = |i: usize| if modulated { modulation[i / c * 2 * c + c + i % c] } else { 0.0 };
            let a: Vec<f32> = (0..n * c).map(|i| weight[i % c] * (1.0 + scale(i))).collect();
            let b: Vec<f32> = (0..n * c).map(|i| bias[i % c] * (1.0 + scale(i)) + shift(i)).collect();
            let [y, dx, da, db] = direct(&x, &a, &b, &dy, s, eps, silu);
            let (mut dweight, mut dbias, mut dmodulation) = (vec![0.0; c], vec![0.0; c], vec![0.0; n * 2 * c]);
            for i in 0..n * c {
                let (sample, k) = (i / c, i % c);
                dweight[k] += da[i] * (1.0 + scale(i) as f64);
                dbias[k] += db[i] * (1.0 + scale(i) as f64);
                dmodulation[sample * 2 * c + k] = da[i] * weight[k] as f64 + db[i] * bias[k] as f64;
                dmodulation[sample * 2 * c + c + k] = db[i];
            }

            let device = Device::flex().autodiff();
            fn t<const D: usize>(v: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
                Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
            }
            let xt = t(&x, [n, c, h, w], &device).require_grad();
            let (wt, bt) = (t(&weight, [c], &device).require_grad(), t(&bias, [c], &device).require_grad());
            let mt = t(&modulation, [n, 2 * c], &device).require_grad();
            let out = group_norm(xt.clone(), wt.clone(), bt.clone(), modulated.then(|| mt.clone()), groups, eps, silu);
            let dyt = t(&dy, [n, c, h, w], &device);
            let grads = (out.clone() * dyt).sum().backward();
            let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
            let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
            let mut errors = vec![
                rel_error(&v(out.inner()), &y),
                rel_error(&v(xt.grad(&grads).unwrap()), &dx),
                rel_error(&v1(wt.grad(&grads).unwrap()), &dweight),
                rel_error(&v1(bt.grad(&grads).unwrap()), &dbias),
            ];
            match mt.grad(&grads) {
                Some(g) => errors.push(rel_error(&g.into_data().try_to_vec::<f32>().unwrap(), &dmodulation)),
                None => assert!(!modulated, "the modulation has no gradient"),
            }
            assert!(errors.iter().all(|e| *e < 2e-5), "modulated {modulated} silu {silu}: relative errors (y, dx, dweight, dbias, dmodulation) {errors:?}");
        }
    }
}
