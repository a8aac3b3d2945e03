//! Group normalisation (and SiLU) as one CubeCL kernel each way, for CUDA: the same operation
//! and backward as `cpu_group_norm` (whose `GroupNormBackend` this implements for CubeCL).
//!
//! `nn::GroupNorm` written with Burn's tensor ops is ~14 kernel launches forward (casts,
//! two-step reductions, centring, squares, broadcasts, then SiLU and the adaptive scale's
//! multiply-adds) and about twice as many backward; on the H100 each launch cost ~30 us, and
//! CubeCL's reduce kernel without autotune gives each output one thread, so the group
//! statistics ran on a few hundred threads. Here one cube of 256 threads takes one (sample,
//! group) unit: it reads the unit twice for its statistics (mean, then the centred variance),
//! summed across the cube in shared memory, and once more to write the output. Backward it
//! recomputes the statistics, sums dz and dz x^ per channel, then writes dx.

use crate::cpu_group_norm::GroupNormBackend;
use crate::fused_update::cube::{empty, f32_contiguous};
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;

/// The sum of every thread's `value`, returned to every thread of the cube (`threads`, a power
/// of two: each step halves the active threads).
#[cube]
fn cube_sum(value: f32, shared: &mut Shared<[f32]>, #[comptime] threads: usize) -> f32 {
    let t = UNIT_POS as usize;
    shared[t] = value;
    sync_cube();
    #[unroll]
    for step in 1..comptime!(threads.trailing_zeros() as usize + 1) {
        let stride = comptime!(threads) >> step;
        if t < stride {
            shared[t] = shared[t] + shared[t + stride];
        }
        sync_cube();
    }
    let total = shared[0];
    // Every thread has read the total before the memory is written again.
    sync_cube();
    total
}

/// A unit's mean and 1 / sqrt(var + eps), by two passes.
#[cube]
fn statistics(x: &Tensor<f32>, start: usize, len: usize, eps: f32, shared: &mut Shared<[f32]>, #[comptime] threads: usize) -> (f32, f32) {
    let t = UNIT_POS as usize;
    let n = f32::cast_from(len);
    let mut acc = 0.0f32;
    let mut i = t;
    while i < len {
        acc += x[start + i];
        i += threads;
    }
    let mean = cube_sum(acc, shared, threads) / n;
    let mut acc = 0.0f32;
    let mut i = t;
    while i < len {
        let d = x[start + i] - mean;
        acc += d * d;
        i += threads;
    }
    let var = cube_sum(acc, shared, threads) / n;
    (mean, 1.0f32 / f32::sqrt(var + eps))
}

#[cube]
fn sigmoid(z: f32) -> f32 {
    1.0f32 / (1.0f32 + f32::exp(-z))
}

/// This cube's (sample, group) unit: its length, its start in `x` (units are sample-major and
/// contiguous) and the [N, C] index of its first channel.
#[cube]
fn this_unit(groups: usize, channels: usize, hw: usize) -> (usize, usize, usize) {
    let unit = CUBE_POS as usize;
    let per_group = channels / groups;
    let len = per_group * hw;
    (len, unit * len, unit / groups * channels + unit % groups * per_group)
}

/// One cube per (sample, group) unit.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(x: &Tensor<f32>, scale: &Tensor<f32>, shift: &Tensor<f32>, y: &mut Tensor<f32>, groups: usize, channels: usize, hw: usize, eps: f32, #[comptime] silu: bool, #[comptime] threads: usize) {
    let (len, start, first) = this_unit(groups, channels, hw);
    let mut shared = Shared::new_slice(threads);
    let (mean, inv_std) = statistics(x, start, len, eps, &mut shared, threads);
    let mut i = UNIT_POS as usize;
    while i < len {
        let k = first + i / hw;
        let z = (x[start + i] - mean) * inv_std * scale[k] + shift[k];
        if silu {
            y[start + i] = z * sigmoid(z);
        } else {
            y[start + i] = z;
        }
        i += threads;
    }
}

/// The gradient at z = x^ scale + shift: `grad`, or grad silu'(z).
#[cube]
fn dz_of(grad: f32, z: f32, #[comptime] silu: bool) -> f32 {
    if silu {
        let s = sigmoid(z);
        grad * s * (1.0f32 + z * (1.0f32 - s))
    } else {
        grad
    }
}

/// Per unit, with x^ = (x - mean) / std, dz the gradient at z and g = dz scale:
/// dx = (g - mean(g) - x^ mean(g x^)) / std; dscale and dshift [N, C] are the sums of dz x^
/// and dz over each (sample, channel).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    x: &Tensor<f32>,
    scale: &Tensor<f32>,
    shift: &Tensor<f32>,
    grad: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    dscale: &mut Tensor<f32>,
    dshift: &mut Tensor<f32>,
    groups: usize,
    channels: usize,
    hw: usize,
    eps: f32,
    #[comptime] silu: bool,
    #[comptime] threads: usize,
) {
    let t = UNIT_POS as usize;
    let per_group = channels / groups;
    let (len, start, first) = this_unit(groups, channels, hw);
    let mut shared = Shared::new_slice(threads);
    let (mean, inv_std) = statistics(x, start, len, eps, &mut shared, threads);
    let mut sum_g = 0.0f32;
    let mut sum_g_xhat = 0.0f32;
    for c in 0..per_group {
        let k = first + c;
        let a = scale[k];
        let b = shift[k];
        let channel_start = start + c * hw;
        let mut acc_dz = 0.0f32;
        let mut acc_dz_xhat = 0.0f32;
        let mut i = t;
        while i < hw {
            let xhat = (x[channel_start + i] - mean) * inv_std;
            let dz = dz_of(grad[channel_start + i], xhat * a + b, silu);
            acc_dz += dz;
            acc_dz_xhat += dz * xhat;
            i += threads;
        }
        let dz_sum = cube_sum(acc_dz, &mut shared, threads);
        let dz_xhat_sum = cube_sum(acc_dz_xhat, &mut shared, threads);
        if t == 0 {
            dscale[k] = dz_xhat_sum;
            dshift[k] = dz_sum;
        }
        sum_g += a * dz_sum;
        sum_g_xhat += a * dz_xhat_sum;
    }
    let n = f32::cast_from(len);
    let mean_g = sum_g / n;
    let mean_g_xhat = sum_g_xhat / n;
    let mut i = t;
    while i < len {
        let k = first + i / hw;
        let xhat = (x[start + i] - mean) * inv_std;
        let dz = dz_of(grad[start + i], xhat * scale[k] + shift[k], silu);
        dx[start + i] = (dz * scale[k] - mean_g - xhat * mean_g_xhat) * inv_std;
        i += threads;
    }
}

/// (N, C, values per channel) of `x` [N, C, ...], checking that C splits into `groups`.
fn sizes(x: &CubeTensor, groups: usize) -> (usize, usize, usize) {
    let shape = x.shape();
    let (n, c) = (shape[0], shape[1]);
    assert!(groups > 0 && c % groups == 0, "group_norm: {c} channels do not split into {groups} groups");
    (n, c, shape.num_elements() / (n * c).max(1))
}

/// One cube per unit, of 256 threads or the largest power of two the device allows in a cube
/// (CubeCL's CPU runtime: its cores, since a cube's threads wait for each other).
fn launch_grid(x: &CubeTensor, n: usize, groups: usize) -> (CubeCount, CubeDim, usize) {
    let most = x.client.properties().hardware.max_cube_dim.0.clamp(1, 256) as usize;
    let threads = 1 << most.ilog2();
    (CubeCount::Static((n * groups) as u32, 1, 1), CubeDim::new_1d(threads as u32), threads)
}

impl GroupNormBackend for CubeBackend {
    fn group_norm(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, groups: usize, eps: f64, silu: bool) -> FloatTensor<Self> {
        let [x, scale, shift] = [x, scale, shift].map(f32_contiguous);
        let (n, c, hw) = sizes(&x, groups);
        let y = empty(&x, x.shape());
        let (count, dim, threads) = launch_grid(&x, n, groups);
        let client = x.client.clone();
        forward_kernel::launch(&client, count, dim, x.into_tensor_arg(), scale.into_tensor_arg(), shift.into_tensor_arg(), y.clone().into_tensor_arg(), groups, c, hw, eps as f32, silu, threads);
        y
    }

    fn group_norm_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let [x, scale, shift, grad] = [x, scale, shift, grad].map(f32_contiguous);
        let (n, c, hw) = sizes(&x, groups);
        let (dx, dscale, dshift) = (empty(&x, x.shape()), empty(&x, Shape::from([n, c])), empty(&x, Shape::from([n, c])));
        let (count, dim, threads) = launch_grid(&x, n, groups);
        let client = x.client.clone();
        backward_kernel::launch(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            scale.into_tensor_arg(),
            shift.into_tensor_arg(),
            grad.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            dscale.clone().into_tensor_arg(),
            dshift.clone().into_tensor_arg(),
            groups,
            c,
            hw,
            eps as f32,
            silu,
            threads,
        );
        (dx, dscale, dshift)
    }
}

/// The kernels on CubeCL's CPU runtime (`--features cube-cpu`, see `fused_update`'s tests)
/// against the flex kernels, which `cpu_group_norm`'s tests check against the definition.
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use crate::cpu_group_norm::group_norm;
    use crate::cpu_group_norm::tests::values;
    use burn::tensor::{Device, Tensor, TensorData};

    /// The relative L2 error of `got` against the flex kernels' `want`.
    fn rel_error(got: &[f32], want: &[f32]) -> f64 {
        crate::cpu_group_norm::tests::rel_error(got, &want.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())
    }

    #[test]
    fn the_cubecl_group_norm_is_the_flex_one() {
        // (n, c, groups, h, w, mean offset): EDM's 32 channels in 8 groups; one group; two
        // values per group; an offset mean; a unit of many times the cube's threads (ImageNet-64's
        // 192 channels in 32 groups at 32x32); a 1x1 image.
        let cases = [(3, 32, 8, 7, 5, 0.0), (2, 6, 1, 4, 4, 0.0), (4, 6, 3, 1, 3, 0.0), (2, 8, 4, 8, 8, 100.0), (2, 192, 32, 32, 32, 0.0), (3, 16, 4, 1, 1, 0.0)];
        for ((n, c, groups, h, w, offset), silu) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
            let run = |device: &Device| {
                let ad = device.clone().autodiff();
                let x = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 1, 4.0, offset), [n, c, h, w]), &ad).require_grad();
                let scale = Tensor::<2>::from_data(TensorData::new(values(n * c, 2, 1.0, 1.0), [n, c]), &ad).require_grad();
                let shift = Tensor::<2>::from_data(TensorData::new(values(n * c, 3, 1.0, 0.0), [n, c]), &ad).require_grad();
                let dy = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 4, 2.0, 0.0), [n, c, h, w]), &ad);
                let y = group_norm(x.clone(), scale.clone(), shift.clone(), groups, 1e-5, silu);
                let grads = (y.clone() * dy).sum().backward();
                let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
                let v2 = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
                [v(y.inner()), v(x.grad(&grads).unwrap()), v2(scale.grad(&grads).unwrap()), v2(shift.grad(&grads).unwrap())]
            };
            let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
            let errors: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_error(g, w)).collect();
            assert!(errors.iter().all(|e| *e < 2e-5), "n {n} c {c} groups {groups} {h}x{w} offset {offset} silu {silu}: relative errors (y, dx, dscale, dshift) {errors:?}");
        }
    }

    /// `nn::GroupNorm` routes CubeCL devices to these kernels, with EDM's adaptive scale and
    /// shift folded in, and autodiff reaches the layer's weights through them.
    #[test]
    fn the_layer_takes_the_cubecl_kernels() {
        use crate::nn::{cube_kernels, GroupNorm, Init};
        let (n, c, h, w) = (2, 64, 6, 5);
        let run = |device: &Device| {
            let ad = device.clone().autodiff();
            let norm = GroupNorm::new(&mut Init::new(&ad, 7), c, 1e-5);
            let x = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 1, 3.0, 0.5), [n, c, h, w]), &ad).require_grad();
            let emb = Tensor::<2>::from_data(TensorData::new(values(n * c, 2, 1.0, 0.0), [n, c]), &ad).require_grad();
            let y = norm.forward_silu(x.clone(), Some((emb.clone(), emb.clone().mul_scalar(0.5)))) + norm.forward(x.clone());
            let dy = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 4, 2.0, 0.0), [n, c, h, w]), &ad);
            let grads = (y.clone() * dy).sum().backward();
            let v4 = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
            let v2 = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
            [v4(y.inner()), v4(x.grad(&grads).unwrap()), v2(emb.grad(&grads).unwrap()), v1(norm.weight.val().grad(&grads).unwrap()), v1(norm.bias.val().grad(&grads).unwrap())]
        };
        assert!(cube_kernels(&Device::cpu().autodiff()) && !cube_kernels(&Device::flex()));
        let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
        let errors: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_error(g, w)).collect();
        assert!(errors.iter().all(|e| *e < 2e-5), "relative errors (y, dx, d emb, d weight, d bias) {errors:?}");
    }
}
