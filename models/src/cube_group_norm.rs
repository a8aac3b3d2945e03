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
//! recomputes the statistics, sums dz and dz x^ per channel, then writes dx; a second, small
//! kernel (a thread per channel) turns those sums into the gradients of the norm's weight and
//! bias and of EDM's modulation. The modulation is read and folded into the affine inside the
//! kernels, so an adaptive block's norm is 1 launch forward and 2 backward instead of ~5 and ~13.

use crate::cpu_group_norm::{GroupNormBackend, Sizes};
use crate::fused_update::cube::{channels_last, cube_per_unit, empty, f32_contiguous, grid, is_channels_last};
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::{permute_nchw_to_nhwc_shape, permute_nhwc_to_nchw};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;

/// The sum (or, where `max`, the largest) of every thread's `value`, returned to every thread
/// of the cube (`threads`, a power of two: each step halves the active threads).
#[cube]
pub(crate) fn cube_reduce(value: f32, shared: &mut Shared<[f32]>, #[comptime] max: bool, #[comptime] threads: usize) -> f32 {
    let t = UNIT_POS as usize;
    shared[t] = value;
    sync_cube();
    #[unroll]
    for step in 1..comptime!(threads.trailing_zeros() as usize + 1) {
        let stride = comptime!(threads) >> step;
        if t < stride {
            if max {
                shared[t] = f32::max(shared[t], shared[t + stride]);
            } else {
                shared[t] = shared[t] + shared[t + stride];
            }
        }
        sync_cube();
    }
    let total = shared[0];
    // Every thread has read the total before the memory is written again.
    sync_cube();
    total
}

/// The sum of every thread's `value` (see [`cube_reduce`]).
#[cube]
pub(crate) fn cube_sum(value: f32, shared: &mut Shared<[f32]>, #[comptime] threads: usize) -> f32 {
    cube_reduce(value, shared, false, threads)
}

/// Where a unit's values lie in memory. Channels first (a contiguous NCHW tensor) the unit is
/// one run, channel-major, from `base`, its first value. Channels last (the NCHW view of a
/// contiguous NHWC buffer, which Burn's CubeCL convolutions return and take without a copy)
/// it is pixel-major, the group's channels adjacent at each pixel, from `base`, its first
/// channel at the first pixel. The position of the group's channel `c` at pixel `p`:
#[cube]
fn position(base: usize, c: usize, p: usize, hw: usize, channels: usize, #[comptime] channels_last: bool) -> usize {
    let mut at = base + c * hw + p;
    if channels_last {
        at = base + p * channels + c;
    }
    at
}

/// The group's channel and the pixel of the unit's `i`-th value in memory order.
#[cube]
fn channel_and_pixel(i: usize, per_group: usize, hw: usize, #[comptime] channels_last: bool) -> (usize, usize) {
    let mut c = i / hw;
    let mut p = i % hw;
    if channels_last {
        c = i % per_group;
        p = i / per_group;
    }
    (c, p)
}

/// A unit's mean and 1 / sqrt(var + eps), by two passes.
#[cube]
#[allow(clippy::too_many_arguments)]
fn statistics(x: &Tensor<f32>, base: usize, per_group: usize, hw: usize, channels: usize, eps: f32, shared: &mut Shared<[f32]>, #[comptime] channels_last: bool, #[comptime] threads: usize) -> (f32, f32) {
    let t = UNIT_POS as usize;
    let len = per_group * hw;
    let n = f32::cast_from(len);
    let mut acc = 0.0f32;
    let mut i = t;
    while i < len {
        let (c, p) = channel_and_pixel(i, per_group, hw, channels_last);
        acc += x[position(base, c, p, hw, channels, channels_last)];
        i += threads;
    }
    let mean = cube_sum(acc, shared, threads) / n;
    let mut acc = 0.0f32;
    let mut i = t;
    while i < len {
        let (c, p) = channel_and_pixel(i, per_group, hw, channels_last);
        let d = x[position(base, c, p, hw, channels, channels_last)] - mean;
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

/// This cube's (sample, group) unit: its channels per group, its sample, its first channel and
/// its `base` (see [`position`]; units are sample-major).
#[cube]
fn this_unit(groups: usize, channels: usize, hw: usize, #[comptime] channels_last: bool) -> (usize, usize, usize, usize) {
    let unit = CUBE_POS as usize;
    let per_group = channels / groups;
    let sample = unit / groups;
    let first = unit % groups * per_group;
    let mut base = unit * per_group * hw;
    if channels_last {
        base = sample * hw * channels + first;
    }
    (per_group, sample, first, base)
}

/// Channel `k`'s affine for `sample`: with the modulation (scale | shift rows, [N, 2C]),
/// weight (1 + scale) and bias (1 + scale) + shift; without, the weight and bias.
#[cube]
#[allow(clippy::too_many_arguments)]
fn affine(weight: &Tensor<f32>, bias: &Tensor<f32>, modulation: &Tensor<f32>, sample: usize, k: usize, channels: usize, #[comptime] modulated: bool) -> (f32, f32) {
    let mut a = weight[k];
    let mut b = bias[k];
    if modulated {
        let row = sample * 2 * channels;
        let factor = modulation[row + k] + 1.0f32;
        a *= factor;
        b = b * factor + modulation[row + channels + k];
    }
    (a, b)
}

/// One cube per (sample, group) unit; `y` in `x`'s layout. Without modulation, `modulation` is
/// never read.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    x: &Tensor<f32>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    modulation: &Tensor<f32>,
    y: &mut Tensor<f32>,
    groups: usize,
    channels: usize,
    hw: usize,
    eps: f32,
    #[comptime] silu: bool,
    #[comptime] modulated: bool,
    #[comptime] channels_last: bool,
    #[comptime] threads: usize,
) {
    let (per_group, sample, first, base) = this_unit(groups, channels, hw, channels_last);
    let mut shared = Shared::new_slice(threads);
    let (mean, inv_std) = statistics(x, base, per_group, hw, channels, eps, &mut shared, channels_last, threads);
    let len = per_group * hw;
    let mut i = UNIT_POS as usize;
    while i < len {
        let (c, p) = channel_and_pixel(i, per_group, hw, channels_last);
        let at = position(base, c, p, hw, channels, channels_last);
        let (a, b) = affine(weight, bias, modulation, sample, first + c, channels, modulated);
        let z = (x[at] - mean) * inv_std * a + b;
        if silu {
            y[at] = z * sigmoid(z);
        } else {
            y[at] = z;
        }
        i += threads;
    }
}

/// The gradient at z = x^ a + b: `grad`, or grad silu'(z).
#[cube]
fn dz_of(grad: f32, z: f32, #[comptime] silu: bool) -> f32 {
    if silu {
        let s = sigmoid(z);
        grad * s * (1.0f32 + z * (1.0f32 - s))
    } else {
        grad
    }
}

/// Per unit, with x^ = (x - mean) / std, a and b the channel's affine, dz the gradient at z and
/// g = dz a: dx = (g - mean(g) - x^ mean(g x^)) / std; `da` and `db` [N, C] are the sums of
/// dz x^ and dz over each (sample, channel), which `affine_gradient_kernel` turns into the
/// weights' and the modulation's gradients.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    x: &Tensor<f32>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    modulation: &Tensor<f32>,
    grad: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    da: &mut Tensor<f32>,
    db: &mut Tensor<f32>,
    groups: usize,
    channels: usize,
    hw: usize,
    eps: f32,
    #[comptime] silu: bool,
    #[comptime] modulated: bool,
    #[comptime] channels_last: bool,
    #[comptime] threads: usize,
) {
    let t = UNIT_POS as usize;
    let (per_group, sample, first, base) = this_unit(groups, channels, hw, channels_last);
    let mut shared = Shared::new_slice(threads);
    let (mean, inv_std) = statistics(x, base, per_group, hw, channels, eps, &mut shared, channels_last, threads);
    let mut sum_g = 0.0f32;
    let mut sum_g_xhat = 0.0f32;
    for c in 0..per_group {
        let k = first + c;
        let (a, b) = affine(weight, bias, modulation, sample, k, channels, modulated);
        let mut acc_dz = 0.0f32;
        let mut acc_dz_xhat = 0.0f32;
        let mut p = t;
        while p < hw {
            let at = position(base, c, p, hw, channels, channels_last);
            let xhat = (x[at] - mean) * inv_std;
            let dz = dz_of(grad[at], xhat * a + b, silu);
            acc_dz += dz;
            acc_dz_xhat += dz * xhat;
            p += threads;
        }
        let dz_sum = cube_sum(acc_dz, &mut shared, threads);
        let dz_xhat_sum = cube_sum(acc_dz_xhat, &mut shared, threads);
        if t == 0 {
            da[sample * channels + k] = dz_xhat_sum;
            db[sample * channels + k] = dz_sum;
        }
        sum_g += a * dz_sum;
        sum_g_xhat += a * dz_xhat_sum;
    }
    let len = per_group * hw;
    let n = f32::cast_from(len);
    let mean_g = sum_g / n;
    let mean_g_xhat = sum_g_xhat / n;
    let mut i = t;
    while i < len {
        let (c, p) = channel_and_pixel(i, per_group, hw, channels_last);
        let at = position(base, c, p, hw, channels, channels_last);
        let (a, b) = affine(weight, bias, modulation, sample, first + c, channels, modulated);
        let xhat = (x[at] - mean) * inv_std;
        let dz = dz_of(grad[at], xhat * a + b, silu);
        dx[at] = (dz * a - mean_g - xhat * mean_g_xhat) * inv_std;
        i += threads;
    }
}

/// One thread per channel k: from the affine's gradients `da`, `db` [N, C], the weight's and
/// bias's (sums over the samples of da (1 + scale) and db (1 + scale)) and, with modulation,
/// the scale's (da weight + db bias) and the shift's (db), as `dmodulation` [N, 2C].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn affine_gradient_kernel(
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    modulation: &Tensor<f32>,
    da: &Tensor<f32>,
    db: &Tensor<f32>,
    dweight: &mut Tensor<f32>,
    dbias: &mut Tensor<f32>,
    dmodulation: &mut Tensor<f32>,
    samples: usize,
    #[comptime] modulated: bool,
) {
    let k = ABSOLUTE_POS;
    let channels = weight.len();
    if k < channels {
        let mut sum_a = 0.0f32;
        let mut sum_b = 0.0f32;
        for sample in 0..samples {
            let ga = da[sample * channels + k];
            let gb = db[sample * channels + k];
            if modulated {
                let row = sample * 2 * channels;
                let factor = modulation[row + k] + 1.0f32;
                sum_a += ga * factor;
                sum_b += gb * factor;
                dmodulation[row + k] = ga * weight[k] + gb * bias[k];
                dmodulation[row + channels + k] = gb;
            } else {
                sum_a += ga;
                sum_b += gb;
            }
        }
        dweight[k] = sum_a;
        dbias[k] = sum_b;
    }
}

/// `t` as float32 in the kernels' layout: contiguous, or channels last.
fn in_layout(t: CubeTensor, last: bool) -> CubeTensor {
    match last {
        true => {
            assert_eq!(t.dtype, DType::F32, "this crate's CubeCL kernels take float32 tensors");
            channels_last(t)
        }
        false => f32_contiguous(t),
    }
}

/// An uninitialised float32 tensor of `like`'s shape in the kernels' layout.
fn empty_in_layout(like: &CubeTensor, channels_last: bool) -> CubeTensor {
    match channels_last {
        true => permute_nhwc_to_nchw(empty(like, permute_nchw_to_nhwc_shape(like.shape()))),
        false => empty(like, like.shape()),
    }
}

/// The kernels' float32 inputs: `x` (and a gradient) in memory as `x` is, channels first or
/// last; the weights contiguous; without modulation, the weight stands in for it (a kernel
/// argument the kernels then never read).
fn inputs(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, modulation: Option<CubeTensor>) -> ([CubeTensor; 4], bool) {
    let channels_last = is_channels_last(&x);
    let [weight, bias] = [weight, bias].map(f32_contiguous);
    let modulation = modulation.map_or_else(|| weight.clone(), f32_contiguous);
    ([in_layout(x, channels_last), weight, bias, modulation], channels_last)
}

fn forward(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, modulation: Option<CubeTensor>, groups: usize, eps: f64, silu: bool) -> CubeTensor {
    let modulated = modulation.is_some();
    let ([x, weight, bias, modulation], channels_last) = inputs(x, weight, bias, modulation);
    let Sizes { n, c, hw, .. } = Sizes::new(&x.shape(), groups);
    let y = empty_in_layout(&x, channels_last);
    let (count, dim, threads) = cube_per_unit(&x, n * groups);
    let client = x.client.clone();
    let [x, weight, bias, modulation, y_arg] = [x, weight, bias, modulation, y.clone()].map(|t| t.into_tensor_arg());
    forward_kernel::launch(&client, count, dim, x, weight, bias, modulation, y_arg, groups, c, hw, eps as f32, silu, modulated, channels_last, threads);
    y
}

/// (dx, dweight, dbias, dmodulation where modulated); dx in `x`'s layout.
#[allow(clippy::too_many_arguments)]
fn backward(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    modulation: Option<CubeTensor>,
    grad: CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> (CubeTensor, CubeTensor, CubeTensor, Option<CubeTensor>) {
    let modulated = modulation.is_some();
    let ([x, weight, bias, modulation], channels_last) = inputs(x, weight, bias, modulation);
    let grad = in_layout(grad, channels_last);
    let Sizes { n, c, hw, .. } = Sizes::new(&x.shape(), groups);
    let (dx, da, db) = (empty_in_layout(&x, channels_last), empty(&x, Shape::from([n, c])), empty(&x, Shape::from([n, c])));
    let (count, dim, threads) = cube_per_unit(&x, n * groups);
    let client = x.client.clone();
    backward_kernel::launch(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        weight.clone().into_tensor_arg(),
        bias.clone().into_tensor_arg(),
        modulation.clone().into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        da.clone().into_tensor_arg(),
        db.clone().into_tensor_arg(),
        groups,
        c,
        hw,
        eps as f32,
        silu,
        modulated,
        channels_last,
        threads,
    );
    let (dweight, dbias) = (empty(&weight, Shape::from([c])), empty(&weight, Shape::from([c])));
    // Without modulation the kernel writes no modulation gradient (a placeholder argument).
    let dmodulation = empty(&weight, Shape::from(if modulated { [n, 2 * c] } else { [1, 1] }));
    let (cube_count, cube_dim) = grid(&weight);
    affine_gradient_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        weight.into_tensor_arg(),
        bias.into_tensor_arg(),
        modulation.into_tensor_arg(),
        da.into_tensor_arg(),
        db.into_tensor_arg(),
        dweight.clone().into_tensor_arg(),
        dbias.clone().into_tensor_arg(),
        dmodulation.clone().into_tensor_arg(),
        n,
        modulated,
    );
    (dx, dweight, dbias, modulated.then_some(dmodulation))
}

impl GroupNormBackend for CubeBackend {
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f64, silu: bool) -> FloatTensor<Self> {
        forward(x, weight, bias, None, groups, eps, silu)
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
        forward(x, weight, bias, Some(modulation), groups, eps, silu)
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
        let (dx, dweight, dbias, _) = backward(x, weight, bias, None, grad, groups, eps, silu);
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
        let (dx, dweight, dbias, dmodulation) = backward(x, weight, bias, Some(modulation), grad, groups, eps, silu);
        (dx, dweight, dbias, dmodulation.expect("modulated backward gives the modulation's gradient"))
    }
}

/// The kernels on CubeCL's CPU runtime (`--features cube-cpu`, see `fused_update`'s tests)
/// against the flex kernels, which `cpu_group_norm`'s tests check against the definition.
#[cfg(all(test, feature = "cube-cpu"))]
pub(crate) mod cube_tests {
    use crate::cpu_group_norm::group_norm;
    use crate::cpu_group_norm::tests::values;
    use burn::tensor::{Device, Tensor, TensorData};

    /// The relative L2 error of `got` against the flex kernels' `want`.
    fn rel_error(got: &[f32], want: &[f32]) -> f64 {
        crate::cpu_group_norm::tests::rel_error(got, &want.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())
    }

    /// `t`'s values as a [N, C, H, W] view of a contiguous [N, H, W, C] buffer with the same
    /// logical values (the layout Burn's CubeCL convolutions return).
    pub(crate) fn channels_last(values: &[f32], [n, c, h, w]: [usize; 4], device: &Device) -> Tensor<4> {
        let mut nhwc = vec![0.0; values.len()];
        for (i, v) in values.iter().enumerate() {
            let (s, k, y, x) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
            nhwc[((s * h + y) * w + x) * c + k] = *v;
        }
        Tensor::<4>::from_data(TensorData::new(nhwc, [n, h, w, c]), device).permute([0, 3, 1, 2])
    }

    /// Whether `t` (a CubeCL tensor) lies in memory channels last.
    pub(crate) fn is_channels_last(t: Tensor<4>) -> bool {
        use burn::backend::{BackendTensor, DispatchTensorKind};
        match t.into_dispatch().kind {
            DispatchTensorKind::Cube(BackendTensor::Float(t)) => crate::fused_update::cube::is_channels_last(&t),
            _ => panic!("not a CubeCL float tensor"),
        }
    }

    #[test]
    fn the_cubecl_group_norm_is_the_flex_one() {
        // (n, c, groups, h, w, mean offset): EDM's 32 channels in 8 groups; one group; two
        // values per group; an offset mean; a unit of many times the cube's threads (ImageNet-64's
        // 192 channels in 32 groups at 32x32); a 1x1 image. Each with and without SiLU and
        // modulation, and with x and the output's gradient in memory channels first or last.
        let cases = [(3, 32, 8, 7, 5, 0.0), (2, 6, 1, 4, 4, 0.0), (4, 6, 3, 1, 3, 0.0), (2, 8, 4, 8, 8, 100.0), (2, 192, 32, 32, 32, 0.0), (3, 16, 4, 1, 1, 0.0)];
        let variants = [(false, false, false, false), (false, true, false, false), (true, false, false, false), (true, true, false, false), (true, true, true, true), (false, false, true, true), (true, true, true, false), (true, false, false, true)];
        for ((n, c, groups, h, w, offset), (silu, modulated, x_last, dy_last)) in cases.into_iter().flat_map(|case| variants.map(|v| (case, v))) {
            let shape = [n, c, h, w];
            let run = |device: &Device| {
                let ad = device.clone().autodiff();
                let tensor = |values: Vec<f32>, last: bool| match last {
                    true => channels_last(&values, shape, &ad),
                    false => Tensor::<4>::from_data(TensorData::new(values, shape), &ad),
                };
                let x = tensor(values(n * c * h * w, 1, 4.0, offset), x_last).require_grad();
                let weight = Tensor::<1>::from_data(TensorData::new(values(c, 2, 1.0, 1.0), [c]), &ad).require_grad();
                let bias = Tensor::<1>::from_data(TensorData::new(values(c, 3, 1.0, 0.0), [c]), &ad).require_grad();
                let modulation = Tensor::<2>::from_data(TensorData::new(values(n * 2 * c, 5, 1.0, 0.0), [n, 2 * c]), &ad).require_grad();
                let dy = tensor(values(n * c * h * w, 4, 2.0, 0.0), dy_last);
                let y = group_norm(x.clone(), weight.clone(), bias.clone(), modulated.then(|| modulation.clone()), groups, 1e-5, silu);
                let grads = (y.clone() * dy).sum().backward();
                let dx = x.grad(&grads).unwrap();
                // The kernels keep a channels-last input's layout (not meaningful for 1x1 images).
                if device == &Device::cpu() && x_last && h * w > 1 {
                    assert!(is_channels_last(y.clone().inner()) && is_channels_last(dx.clone()), "channels-last input, output and gradient");
                }
                let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
                let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
                let dmodulation = modulation.grad(&grads).map_or_else(Vec::new, |g| g.into_data().try_to_vec::<f32>().unwrap());
                [v(y.inner()), v(dx), v1(weight.grad(&grads).unwrap()), v1(bias.grad(&grads).unwrap()), dmodulation]
            };
            let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
            assert_eq!(got[4].len(), if modulated { n * 2 * c } else { 0 }, "the modulation's gradient");
            let errors: Vec<f64> = want.iter().zip(&got).filter(|(w, _)| !w.is_empty()).map(|(w, g)| rel_error(g, w)).collect();
            assert!(
                errors.iter().all(|e| *e < 2e-5),
                "n {n} c {c} groups {groups} {h}x{w} offset {offset} silu {silu} modulated {modulated} x, dy channels last {x_last}, {dy_last}: relative errors (y, dx, dweight, dbias, dmodulation) {errors:?}"
            );
        }
    }

    /// `nn::GroupNorm` routes CubeCL devices to these kernels, with EDM's adaptive scale and
    /// shift, and autodiff reaches the layer's weights and the modulation through them.
    #[test]
    fn the_layer_takes_the_cubecl_kernels() {
        use crate::nn::{cube_kernels, GroupNorm, Init};
        let (n, c, h, w) = (2, 64, 6, 5);
        let run = |device: &Device| {
            let ad = device.clone().autodiff();
            let norm = GroupNorm::new(&mut Init::new(&ad, 7), c, 1e-5);
            let x = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 1, 3.0, 0.5), [n, c, h, w]), &ad).require_grad();
            let emb = Tensor::<2>::from_data(TensorData::new(values(n * 2 * c, 2, 1.0, 0.0), [n, 2 * c]), &ad).require_grad();
            let y = norm.forward_silu(x.clone(), Some(emb.clone())) + norm.forward(x.clone());
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
