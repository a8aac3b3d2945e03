//! EDM's self-attention as one operation with its own backward on CUDA: `cpu_attention`'s
//! `AttentionBackend` for CubeCL, in float32.
//!
//! Written with Burn's tensor ops, the attention of a UNet block was 11 kernel launches
//! forward (copies of the q/k/v views, the key's scaling, two products, a softmax of five
//! passes) and 26 backward (the softmax's and the views' gradients: zero-filled tensors,
//! slice assignments, sums); on the H100 each launch cost ~30 us. Here q, k and v are strided
//! views of the [q; k; v] input, read by Burn's matrix products directly, the softmax is one
//! kernel each way (a cube per row), and the input gradient is assembled by one kernel: 3
//! launches forward, 8 backward (one more each where the input is not contiguous). The attention weights are recomputed in the backward pass
//! rather than kept, as on flex.

use crate::cpu_attention::{AttentionBackend, Sizes};
use crate::cube_group_norm::{cube_reduce, cube_sum};
use crate::fused_update::cube::{cube_per_unit, empty, f32_contiguous, grid};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;

/// One cube per row of `s` [rows, width]: p = softmax(s * scale) along the row.
#[cube(launch)]
fn softmax_kernel(s: &Tensor<f32>, p: &mut Tensor<f32>, width: usize, scale: f32, #[comptime] threads: usize) {
    let start = CUBE_POS as usize * width;
    let t = UNIT_POS as usize;
    let mut shared = Shared::new_slice(threads);
    let mut local = f32::new(-3.0e38);
    let mut j = t;
    while j < width {
        local = f32::max(local, s[start + j]);
        j += threads;
    }
    let max = cube_reduce(local, &mut shared, true, threads) * scale;
    let mut acc = 0.0f32;
    let mut j = t;
    while j < width {
        let e = f32::exp(s[start + j] * scale - max);
        p[start + j] = e;
        acc += e;
        j += threads;
    }
    let inv = 1.0f32 / cube_sum(acc, &mut shared, threads);
    let mut j = t;
    while j < width {
        p[start + j] = p[start + j] * inv;
        j += threads;
    }
}

/// One cube per row: the gradient at the scaled scores, ds = scale p (dp - sum(dp p)), from
/// the weights `p` and their gradient `dp`.
#[cube(launch)]
fn softmax_backward_kernel(p: &Tensor<f32>, dp: &Tensor<f32>, ds: &mut Tensor<f32>, width: usize, scale: f32, #[comptime] threads: usize) {
    let start = CUBE_POS as usize * width;
    let t = UNIT_POS as usize;
    let mut shared = Shared::new_slice(threads);
    let mut acc = 0.0f32;
    let mut j = t;
    while j < width {
        acc += dp[start + j] * p[start + j];
        j += threads;
    }
    let dot = cube_sum(acc, &mut shared, threads);
    let mut j = t;
    while j < width {
        ds[start + j] = scale * p[start + j] * (dp[start + j] - dot);
        j += threads;
    }
}

/// One thread per value of `dqkv` [units, ch, 3, hw]: dq, dk and dv [units, ch, hw] put back
/// in the input's interleaved layout.
#[cube(launch)]
fn interleave_kernel(dq: &Tensor<f32>, dk: &Tensor<f32>, dv: &Tensor<f32>, dqkv: &mut Tensor<f32>, hw: usize) {
    let i = ABSOLUTE_POS;
    if i < dqkv.len() {
        let j = i % hw;
        let part = i / hw % 3;
        let row = i / (3 * hw);
        let from = row * hw + j;
        if part == 0 {
            dqkv[i] = dq[from];
        } else if part == 1 {
            dqkv[i] = dk[from];
        } else {
            dqkv[i] = dv[from];
        }
    }
}

/// `qkv` [N, 3C, H, W] (contiguous) as units = N * heads, ch channels per head, hw positions,
/// and the views q, k, v [units, ch, hw] of it (rows 3 hw apart).
fn views(qkv: CubeTensor, heads: usize) -> ((usize, usize, usize), [CubeTensor; 3]) {
    let Sizes { units, ch, hw } = Sizes::new(&qkv.shape(), heads);
    // Each unit's channel rows hold [q | k | v]: slicing the rows gives the views (a reshape of
    // a slice of [units, ch, 3, hw] would copy).
    let t = CubeBackend::float_reshape(qkv, Shape::from([units, ch, 3 * hw]));
    let part = |i: usize| CubeBackend::float_slice(t.clone(), &[(0..units).into(), (0..ch).into(), (i * hw..(i + 1) * hw).into()]);
    ((units, ch, hw), [part(0), part(1), part(2)])
}

/// The attention weights softmax(q^T k / sqrt(ch)), [units, hw, hw].
fn weights(q: CubeTensor, k: CubeTensor, units: usize, ch: usize, hw: usize) -> CubeTensor {
    // Contiguous for the kernel's linear rows (a product's output may have padded rows on CUDA).
    let s = f32_contiguous(CubeBackend::float_matmul(CubeBackend::float_swap_dims(q, 1, 2), k));
    let p = empty(&s, s.shape());
    let (count, dim, threads) = cube_per_unit(&s, units * hw);
    let client = s.client.clone();
    softmax_kernel::launch(&client, count, dim, s.into_tensor_arg(), p.clone().into_tensor_arg(), hw, 1.0 / (ch as f32).sqrt(), threads);
    p
}

impl AttentionBackend for CubeBackend {
    fn edm_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let shape = qkv.shape();
        let ((units, ch, hw), [q, k, v]) = views(f32_contiguous(qkv), heads);
        let p = weights(q, k, units, ch, hw);
        // out [units, ch, hw_q] = v [ch, hw_k] P^T.
        let out = Self::float_matmul(v, Self::float_swap_dims(p, 1, 2));
        Self::float_reshape(out, Shape::from([shape[0], shape[1] / 3, shape[2], shape[3]]))
    }

    fn edm_attention_backward(qkv: FloatTensor<Self>, grad: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let shape = qkv.shape();
        let ((units, ch, hw), [q, k, v]) = views(f32_contiguous(qkv), heads);
        let p = weights(q.clone(), k.clone(), units, ch, hw);
        let dout = Self::float_reshape(f32_contiguous(grad), Shape::from([units, ch, hw]));
        // dv [ch, hw_k] = dout P; dP [hw_q, hw_k] = dout^T v.
        let dv = Self::float_matmul(dout.clone(), p.clone());
        let dp = f32_contiguous(Self::float_matmul(Self::float_swap_dims(dout, 1, 2), v));
        let ds = empty(&dp, dp.shape());
        let (count, dim, threads) = cube_per_unit(&dp, units * hw);
        let client = dp.client.clone();
        softmax_backward_kernel::launch(&client, count, dim, p.into_tensor_arg(), dp.into_tensor_arg(), ds.clone().into_tensor_arg(), hw, 1.0 / (ch as f32).sqrt(), threads);
        // dq [ch, hw_q] = k dS^T; dk [ch, hw_k] = q dS.
        let dq = Self::float_matmul(k, Self::float_swap_dims(ds.clone(), 1, 2));
        let dk = Self::float_matmul(q, ds);
        let [dq, dk, dv] = [dq, dk, dv].map(f32_contiguous);
        let dqkv = empty(&dq, shape);
        let (cube_count, cube_dim) = grid(&dqkv);
        interleave_kernel::launch(&client, cube_count, cube_dim, dq.into_tensor_arg(), dk.into_tensor_arg(), dv.into_tensor_arg(), dqkv.clone().into_tensor_arg(), hw);
        dqkv
    }
}

/// The kernels on CubeCL's CPU runtime (`--features cube-cpu`, see `fused_update`'s tests)
/// against the flex operation, which `cpu_attention`'s tests check against the definition.
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use crate::cpu_group_norm::tests::{rel_error, values};
    use crate::cube_group_norm::cube_tests::channels_last;
    use crate::nn::attention;
    use burn::tensor::{Device, Tensor, TensorData};

    #[test]
    fn the_cubecl_attention_is_the_flex_one() {
        // (n, heads, channels per head, h, w): adm_tiny's 64 channels in one head at 8x8; two
        // heads of 3 channels over 15 positions (rows not a multiple of the cube's threads);
        // one position. Each with the input in memory channels first or last.
        let cases = [(2, 1, 64, 8, 8), (3, 2, 3, 3, 5), (2, 2, 4, 1, 1)];
        for ((n, heads, ch, h, w), last) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
            let c3 = 3 * heads * ch;
            let run = |device: &Device| {
                let ad = device.clone().autodiff();
                let x = values(n * c3 * h * w, 1, 3.0, 0.0);
                let qkv = match last {
                    true => channels_last(&x, [n, c3, h, w], &ad),
                    false => Tensor::<4>::from_data(TensorData::new(x, [n, c3, h, w]), &ad),
                }
                .require_grad();
                let dy = Tensor::<4>::from_data(TensorData::new(values(n * c3 / 3 * h * w, 2, 2.0, 0.0), [n, c3 / 3, h, w]), &ad);
                let y = attention(qkv.clone(), heads);
                let grads = (y.clone() * dy).sum().backward();
                let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
                [v(y.inner()), v(qkv.grad(&grads).unwrap())]
            };
            let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
            let errors: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_error(g, &w.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())).collect();
            assert!(errors.iter().all(|e| *e < 2e-5), "n {n} heads {heads} ch {ch} {h}x{w} channels last {last}: relative errors (y, dqkv) {errors:?}");
        }
    }
}
