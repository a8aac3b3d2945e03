//! The per-parameter updates of training, each as one kernel per parameter: Adam's and
//! AdamW's step and the EMA's average; a parallel pass on Burn's flex CPU backend, a CubeCL
//! kernel on CUDA.
//!
//! Burn's `Adam` and `AdamW` update each parameter with about fifteen tensor ops (two moments,
//! bias corrections, square root, division, decay), each a fresh allocation; the EMA takes
//! three. On flex each is a single-threaded pass: Adam was 2.7 ms of adm_tiny's ~120 ms
//! training step, with one core idle. On CUDA each is a kernel launch: ~7800 launches per
//! Adam step for ImageNet-64's ADM (~600 tensors), 227 of its 667 ms teacher step on an H100,
//! where the arithmetic is ~20 ms of memory traffic. Here one kernel reads each input once and
//! writes each output once, with the same float32 operations in the same order as Burn's ops:
//! on flex the results are the same bits (`experiments/src/optim.rs` and `ema.rs` test that
//! against Burn's optimisers and ops); a GPU compiler may contract a multiply-add, so CUDA
//! agrees to rounding.

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

// CubeCL: `mod cube` below (see models/build.rs for `cube_kernels`).
#[backend_extension(Flex, Cube: cfg(cube_kernels))]
pub trait UpdateBackend: Backend {
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

    /// ema * beta + net * one_minus_beta.
    fn ema_update(ema: FloatTensor<Self>, net: FloatTensor<Self>, beta: f32, one_minus_beta: f32) -> FloatTensor<Self>;

    /// `partials` [rows, SQUARE_PARTS] with row `slot` replaced by partial sums of the squares
    /// of `x`'s values, which add up to its sum of squares (float32; in place where `partials`
    /// is not shared).
    fn square_sums_into(partials: FloatTensor<Self>, slot: usize, x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Partial sums per tensor in [`UpdateBackend::square_sums_into`]: on CUDA the cubes that share a
/// tensor (one kernel per tensor instead of a copy into one concatenation, a square and a sum).
pub const SQUARE_PARTS: usize = 64;

/// Elements per parallel task on flex.
const CHUNK: usize = 1 << 14;

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("fused_update on flex: contiguous float32 tensors")
}

impl UpdateBackend for Flex {
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

    fn ema_update(ema: FloatTensor<Self>, net: FloatTensor<Self>, beta: f32, one_minus_beta: f32) -> FloatTensor<Self> {
        let [ema, net] = [ema, net].map(|t| contiguous(&t));
        let (e, n) = (f32s(&ema), f32s(&net));
        let mut out = uninit(e.len());
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            let r = i * CHUNK..i * CHUNK + o.len();
            for ((o, e), n) in o.iter_mut().zip(&e[r.clone()]).zip(&n[r]) {
                // Burn's order: ema * beta + net * (1 - beta).
                o.write(e * beta + n * one_minus_beta);
            }
        });
        // Safety: every chunk writes all its values.
        FlexTensor::from_data(TensorData::new(unsafe { assume_init(out) }, ema.layout().shape().clone()))
    }

    fn square_sums_into(partials: FloatTensor<Self>, slot: usize, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (partials, x) = (contiguous(&partials), contiguous(&x));
        let shape = partials.layout().shape().clone();
        let mut rows = f32s(&partials).to_vec();
        let v = f32s(&x);
        let part = v.len().div_ceil(SQUARE_PARTS).max(1);
        for (k, out) in rows[slot * SQUARE_PARTS..][..SQUARE_PARTS].iter_mut().enumerate() {
            let values = v.get(k * part..).map_or(&[][..], |rest| &rest[..rest.len().min(part)]);
            *out = values.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() as f32;
        }
        FlexTensor::from_data(TensorData::new(rows, shape))
    }
}

#[cfg(cube_kernels)]
pub(crate) mod cube {
    use super::UpdateBackend;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::TensorMetadata;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nhwc_to_nchw};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeBackend;

    /// Where value `i` (in `like`'s contiguous order) of `t`, a tensor of `like`'s shape with
    /// strides of its own, lies in `t`'s buffer.
    #[cube]
    fn strided_offset(i: usize, like: &Tensor<f32>, t: &Tensor<f32>) -> usize {
        let mut offset = 0usize;
        for d in 0..t.rank() {
            offset += (i / like.stride(d)) % like.shape(d) * t.stride(d);
        }
        offset
    }

    /// One thread per element; the same operations in the same order as the flex kernel. A
    /// `strided_grad` (a permutation of a contiguous layout, e.g. a convolution's weight
    /// gradient computed channels last) is read where it lies instead of being copied first.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn adam_kernel(
        param: &Tensor<f32>,
        grad: &Tensor<f32>,
        m1: &Tensor<f32>,
        m2: &Tensor<f32>,
        new_param: &mut Tensor<f32>,
        new_m1: &mut Tensor<f32>,
        new_m2: &mut Tensor<f32>,
        beta_1: f32,
        one_minus_beta_1: f32,
        beta_2: f32,
        one_minus_beta_2: f32,
        m1_scale: f32,
        m1_divisor: f32,
        m2_divisor: f32,
        epsilon: f32,
        decay: f32,
        lr: f32,
        #[comptime] strided_grad: bool,
    ) {
        let i = ABSOLUTE_POS;
        if i < param.len() {
            let mut at = i;
            if strided_grad {
                at = strided_offset(i, param, grad);
            }
            let g = grad[at];
            let a = m1[i] * beta_1 + g * one_minus_beta_1;
            let b = m2[i] * beta_2 + (g * g) * one_minus_beta_2;
            let update = ((a * m1_scale) / m1_divisor) / (f32::sqrt(b / m2_divisor) + epsilon);
            new_param[i] = param[i] * decay - update * lr;
            new_m1[i] = a;
            new_m2[i] = b;
        }
    }

    /// One of `SQUARE_PARTS` cubes on `x`'s `len` values: its threads' sums of squares, added
    /// in the cube, into `partials[slot * SQUARE_PARTS + cube]`.
    #[cube(launch)]
    fn square_sum_kernel(x: &Tensor<f32>, partials: &mut Tensor<f32>, len: usize, slot: usize, #[comptime] threads: usize) {
        let mut shared = Shared::new_slice(threads);
        let step = comptime!(crate::fused_update::SQUARE_PARTS * threads);
        let mut i = CUBE_POS as usize * threads + UNIT_POS as usize;
        let mut acc = 0.0f32;
        while i < len {
            acc += x[i] * x[i];
            i += step;
        }
        let total = crate::cube_group_norm::cube_sum(acc, &mut shared, threads);
        if UNIT_POS == 0 {
            partials[slot * comptime!(crate::fused_update::SQUARE_PARTS) + CUBE_POS as usize] = total;
        }
    }

    /// Whether `t`'s values are its buffer's first `len` values in some order (a permutation of
    /// a contiguous layout, such as a convolution's channels-last weight gradient): a sum over
    /// them can read the buffer in order, without a copy.
    fn is_dense(t: &CubeTensor) -> bool {
        let shape = t.shape();
        let mut dims: Vec<(usize, usize)> = t.meta.strides().iter().copied().zip(shape.iter().copied()).filter(|&(_, n)| n > 1).collect();
        dims.sort_unstable();
        let mut expected = 1;
        dims.iter().all(|&(stride, n)| {
            let ok = stride == expected;
            expected *= n;
            ok
        })
    }

    #[cube(launch)]
    fn ema_kernel(ema: &Tensor<f32>, net: &Tensor<f32>, out: &mut Tensor<f32>, beta: f32, one_minus_beta: f32) {
        let i = ABSOLUTE_POS;
        if i < ema.len() {
            out[i] = ema[i] * beta + net[i] * one_minus_beta;
        }
    }

    /// An uninitialised contiguous tensor of `shape` on `like`'s device, in its dtype. Truly
    /// contiguous: the kernels write it by linear position, and CUDA's default allocation
    /// (Burn's `empty_device_dtype`) pads each row whose bytes are not a multiple of its
    /// alignment (a 3x3 convolution's weight, whose last dimension is 3, gets rows of 4).
    pub(crate) fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
        empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
    }

    /// `t` made contiguous (the kernels index every tensor by its contiguous position),
    /// checked to be float32 (the kernels read every buffer as float32).
    pub(crate) fn f32_contiguous(t: CubeTensor) -> CubeTensor {
        assert_eq!(t.dtype, DType::F32, "this crate's CubeCL kernels take float32 tensors");
        into_contiguous(t)
    }

    /// Whether `t` [N, C, H, W] is the NCHW view of a contiguous NHWC buffer ("channels
    /// last"), the layout in which Burn's CubeCL convolutions compute: they return their
    /// outputs (and input gradients) so, and take such inputs without a copy.
    pub(crate) fn is_channels_last(t: &CubeTensor) -> bool {
        let shape = t.shape();
        if shape.num_dims() != 4 {
            return false;
        }
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        t.meta.strides()[..] == [h * w * c, 1, w * c, c]
    }

    /// `t` [N, C, H, W] channels last, copied only where it is not so already.
    pub(crate) fn channels_last(t: CubeTensor) -> CubeTensor {
        if is_channels_last(&t) {
            return t;
        }
        permute_nhwc_to_nchw(into_contiguous(permute_nchw_to_nhwc(t)))
    }

    /// The launch grid of one cube per unit of work (`units` of them) for kernels on `t`'s
    /// device, with the cube's threads: 256, or the largest power of two the device allows in
    /// a cube (CubeCL's CPU runtime: its cores, since a cube's threads wait for each other);
    /// `DMD_CUBE_THREADS` (a power of two up to 1024) overrides both, to tune on a GPU or to
    /// run GPU-sized cubes on the CPU runtime (which then runs a thread per unit, slowly).
    pub(crate) fn cube_per_unit(t: &CubeTensor, units: usize) -> (CubeCount, CubeDim, usize) {
        let threads = cube_threads_override().unwrap_or_else(|| {
            let most = t.client.properties().hardware.max_cube_dim.0.clamp(1, 256) as usize;
            1 << most.ilog2()
        });
        (CubeCount::Static(units as u32, 1, 1), CubeDim::new_1d(threads as u32), threads)
    }

    /// `DMD_CUBE_THREADS`, read once; a value that is not a power of two up to 1024 is
    /// reported once and ignored.
    fn cube_threads_override() -> Option<usize> {
        static VALUE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        *VALUE.get_or_init(|| {
            let raw = std::env::var("DMD_CUBE_THREADS").ok()?;
            match raw.trim().parse::<usize>() {
                Ok(n) if n.is_power_of_two() && n <= 1024 => Some(n),
                _ => {
                    eprintln!("warning: DMD_CUBE_THREADS={raw:?} ignored: expected a power of two up to 1024");
                    None
                }
            }
        })
    }

    /// The launch grid of one thread per element of `t`.
    pub(crate) fn grid(t: &CubeTensor) -> (CubeCount, CubeDim) {
        let n = t.shape().num_elements();
        let cube_dim = CubeDim::new(&t.client, n);
        (cubecl::calculate_cube_count_elemwise(&t.client, n, cube_dim), cube_dim)
    }

    impl UpdateBackend for CubeBackend {
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
            let strided_grad = grad.dtype == DType::F32 && !grad.is_contiguous() && is_dense(&grad);
            let grad = if strided_grad { grad } else { f32_contiguous(grad) };
            let [param, m1, m2] = [param, m1, m2].map(f32_contiguous);
            let client = param.client.clone();
            let (new_param, new_m1, new_m2) = (empty(&param, param.shape()), empty(&param, param.shape()), empty(&param, param.shape()));
            let (cube_count, cube_dim) = grid(&param);
            adam_kernel::launch(
                &client,
                cube_count,
                cube_dim,
                param.into_tensor_arg(),
                grad.into_tensor_arg(),
                m1.into_tensor_arg(),
                m2.into_tensor_arg(),
                new_param.clone().into_tensor_arg(),
                new_m1.clone().into_tensor_arg(),
                new_m2.clone().into_tensor_arg(),
                beta_1,
                1.0 - beta_1,
                beta_2,
                1.0 - beta_2,
                m1_scale,
                m1_divisor,
                m2_divisor,
                epsilon,
                decay,
                lr,
                strided_grad,
            );
            (new_param, new_m1, new_m2)
        }

        fn ema_update(ema: FloatTensor<Self>, net: FloatTensor<Self>, beta: f32, one_minus_beta: f32) -> FloatTensor<Self> {
            let [ema, net] = [ema, net].map(f32_contiguous);
            let client = ema.client.clone();
            let out = empty(&ema, ema.shape());
            let (cube_count, cube_dim) = grid(&ema);
            ema_kernel::launch(&client, cube_count, cube_dim, ema.into_tensor_arg(), net.into_tensor_arg(), out.clone().into_tensor_arg(), beta, one_minus_beta);
            out
        }

        fn square_sums_into(partials: FloatTensor<Self>, slot: usize, x: FloatTensor<Self>) -> FloatTensor<Self> {
            assert_eq!(x.dtype, DType::F32, "this crate's CubeCL kernels take float32 tensors");
            assert!(partials.is_contiguous() && partials.is_contiguous_buffer(), "square_sums_into: the partial sums must be truly contiguous");
            let partials = if partials.can_mut() { partials } else { partials.copy() };
            let x = if is_dense(&x) { x } else { into_contiguous(x) };
            let len = x.shape().num_elements();
            let (count, dim, threads) = cube_per_unit(&x, super::SQUARE_PARTS);
            square_sum_kernel::launch(&x.client.clone(), count, dim, x.into_tensor_arg(), partials.clone().into_tensor_arg(), len, slot, threads);
            partials
        }
    }
}

/// Whether [`adam_update`] and [`ema_update`] take `t`: a float32 tensor not tracked by
/// autodiff (as the optimisers' and the EMA's are) on flex, or on a CubeCL device (CUDA) in a
/// build without Burn's fusion (which fuses Burn's own update ops into a few kernels instead).
pub fn takes<const D: usize>(t: &Tensor<D>) -> bool {
    // `Device`'s equality ignores autodiff; the extension has no autodiff routing.
    let device = t.device();
    t.dtype() == DType::F32 && !device.is_autodiff() && (device == Device::flex() || crate::nn::cube_kernels(&device))
}

/// The sum of squares of all `tensors`' values, each of which [`takes`] (in any dimension, as
/// Burn's dispatch primitives: `Tensor::into_dispatch`; all on `device`): one kernel per tensor, with the
/// partial sums read back at once and added in float64 on the host.
pub fn sum_of_squares(tensors: Vec<FloatTensor<Dispatch>>, device: &Device) -> f64 {
    if tensors.is_empty() {
        return 0.0;
    }
    let mut partials = Tensor::<2>::zeros([tensors.len(), SQUARE_PARTS], device).into_dispatch();
    for (slot, x) in tensors.into_iter().enumerate() {
        partials = <Dispatch as UpdateBackend>::square_sums_into(partials, slot, x);
    }
    Tensor::<2>::from_dispatch(partials).into_data().iter::<f32>().map(f64::from).sum()
}

/// The step on a parameter, its gradient and moments, all of which [`takes`]: (param, m1, m2).
pub fn adam_update<const D: usize>(param: Tensor<D>, grad: Tensor<D>, m1: Tensor<D>, m2: Tensor<D>, s: AdamStep) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, a, b) = <Dispatch as UpdateBackend>::adam_update(
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

/// `ema * beta + net * (1 - beta)` with both factors rounded to float32 as Burn's `mul_scalar`
/// rounds them, for tensors [`takes`] takes.
pub fn ema_update<const D: usize>(ema: Tensor<D>, net: Tensor<D>, beta: f64) -> Tensor<D> {
    let out = <Dispatch as UpdateBackend>::ema_update(ema.into_dispatch(), net.into_dispatch(), beta as f32, (1.0 - beta) as f32);
    Tensor::from_dispatch(out)
}

/// The CubeCL kernels on CubeCL's CPU runtime (`cargo test -p dmd-models --features cube-cpu`:
/// the same kernel source the CUDA build compiles, here through LLVM; not part of CI, whose
/// 2-core budget the extra LLVM-linked build would not fit) against the update's definition
/// in float64. LLVM contracts the kernels' multiply-adds into fused ones (as a GPU compiler
/// may), so the results are not the flex kernel's bits (those `experiments/src/optim.rs` and
/// `ema.rs` check against Burn's ops): each value must lie within a few float32 roundings of
/// its terms' magnitudes of the definition.
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use super::*;

    /// float32 rounding, with room for the few roundings of each step.
    const ROUNDING: f64 = 8.0 * f32::EPSILON as f64;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64).map(|i| ((i * 2654435761 + seed * 40503) % 65536) as f32 / 32768.0 - 1.0).collect()
    }

    /// A [rows, cols] tensor of `values`, or (`transposed`) the transpose of a [cols, rows]
    /// one: not contiguous. Where `zeros`, every 7th stored value is 0.
    fn tensor(rows: usize, cols: usize, seed: u64, transposed: bool, zeros: bool, device: &Device) -> Tensor<2> {
        let mut v = values(rows * cols, seed);
        if zeros {
            v.iter_mut().step_by(7).for_each(|v| *v = 0.0);
        }
        if transposed {
            Tensor::<2>::from_data(TensorData::new(v, [cols, rows]), device).transpose()
        } else {
            Tensor::<2>::from_data(TensorData::new(v, [rows, cols]), device)
        }
    }

    fn f64s(t: Tensor<2>) -> Vec<f64> {
        t.into_data().try_to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    /// `got` against `want` with per-value bounds `tol`.
    fn assert_within(what: &str, got: &[f64], want: &[f64], tol: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let bad: Vec<_> = (0..got.len()).filter(|&k| !((got[k] - want[k]).abs() <= tol[k])).collect();
        if let Some(&k) = bad.first() {
            panic!("{what}: {} of {} values off the definition; value {k}: {} against {} (bound {:e})", bad.len(), got.len(), got[k], want[k], tol[k]);
        }
    }

    /// An odd size, one spanning many cubes, and a non-contiguous input.
    const SHAPES: [(usize, usize, bool); 3] = [(37, 41, false), (613, 499, false), (64, 96, true)];

    #[test]
    fn the_cubecl_adam_kernel_computes_the_step() {
        let adam = AdamStep { beta_1: 0.9, beta_2: 0.999, m1_scale: 0.0316, m1_divisor: 1.0, m2_divisor: 1.0, epsilon: 3.2e-10, decay: 1.0, lr: 1e-3 };
        let adamw = AdamStep { beta_1: 0.0, beta_2: 0.99, m1_scale: 1.0, m1_divisor: 0.19, m2_divisor: 0.0199, epsilon: 1e-8, decay: 0.99999, lr: 2e-4 };
        let device = Device::cpu();
        for (rows, cols, transposed) in SHAPES {
            for (name, s) in [("Adam", adam), ("AdamW", adamw)] {
                let t = |seed, zeros| tensor(rows, cols, seed, transposed, zeros, &device);
                // Second moments are non-negative. Where the gradient and the second moment
                // are 0, epsilon alone bounds the step.
                let (param, grad, m1, m2) = (t(1, false), t(2, true), t(3, false), t(4, true).abs());
                assert!(takes(&param) && takes(&grad), "adam_update does not take tensors on {device:?}");
                let (p, g, a, b) = (f64s(param.clone()), f64s(grad.clone()), f64s(m1.clone()), f64s(m2.clone()));
                let (new_p, new_a, new_b) = adam_update(param, grad, m1, m2, s);
                let [beta_1, beta_2, m1_scale, m1_divisor, m2_divisor, epsilon, decay, lr] = [s.beta_1, s.beta_2, s.m1_scale, s.m1_divisor, s.m2_divisor, s.epsilon, s.decay, s.lr].map(f64::from);
                let (one_1, one_2) = (f64::from(1.0 - s.beta_1), f64::from(1.0 - s.beta_2));
                let n = p.len();
                let (mut want, mut tol) = ([vec![0.0; n], vec![0.0; n], vec![0.0; n]], [vec![0.0; n], vec![0.0; n], vec![0.0; n]]);
                for k in 0..n {
                    let m1 = a[k] * beta_1 + g[k] * one_1;
                    let m1_tol = ROUNDING * ((a[k] * beta_1).abs() + (g[k] * one_1).abs());
                    let m2 = b[k] * beta_2 + g[k] * g[k] * one_2;
                    // Non-negative terms: no cancellation.
                    let m2_tol = ROUNDING * m2;
                    let denominator = (m2 / m2_divisor).sqrt() + epsilon;
                    let update = m1 * m1_scale / m1_divisor / denominator;
                    let update_tol = m1_tol * m1_scale / m1_divisor / denominator + 2.0 * ROUNDING * update.abs();
                    want[0][k] = p[k] * decay - update * lr;
                    tol[0][k] = ROUNDING * ((p[k] * decay).abs() + (update * lr).abs()) + update_tol * lr;
                    (want[1][k], tol[1][k], want[2][k], tol[2][k]) = (m1, m1_tol, m2, m2_tol);
                }
                let what = |w: &str| format!("{name} {rows}x{cols}, {w}");
                assert_within(&what("parameter"), &f64s(new_p), &want[0], &tol[0]);
                assert_within(&what("first moment"), &f64s(new_a), &want[1], &tol[1]);
                assert_within(&what("second moment"), &f64s(new_b), &want[2], &tol[2]);
            }
        }
    }

    #[test]
    fn the_cubecl_square_sums_are_the_sum_of_squares() {
        let device = Device::cpu();
        // Contiguous of several sizes (fewer values than cubes, more than all threads), a
        // transposed view (dense: read in place), and a column slice (not dense: copied).
        let base = tensor(613, 499, 7, false, false, &device);
        let tensors: Vec<Tensor<2>> = vec![
            tensor(1, 3, 1, false, false, &device),
            tensor(37, 41, 2, false, false, &device),
            base.clone(),
            tensor(64, 96, 3, true, false, &device),
            base.slice([0..613, 5..260]),
        ];
        for t in &tensors {
            let want: f64 = f64s(t.clone()).iter().map(|v| v * v).sum();
            let got = sum_of_squares(vec![t.clone().into_dispatch()], &device);
            assert!((got - want).abs() <= 1e-6 * want, "{:?}: {got} against {want}", t.shape());
        }
        let want: f64 = tensors.iter().map(|t| f64s(t.clone()).iter().map(|v| v * v).sum::<f64>()).sum();
        let got = sum_of_squares(tensors.into_iter().map(Tensor::into_dispatch).collect(), &device);
        assert!((got - want).abs() <= 1e-6 * want, "all five: {got} against {want}");
    }

    #[test]
    fn the_cubecl_ema_kernel_computes_the_average() {
        let device = Device::cpu();
        for (rows, cols, transposed) in SHAPES {
            for beta in [0.0, 0.999, 0.99993] {
                let (ema, net) = (tensor(rows, cols, 5, false, false, &device), tensor(rows, cols, 6, transposed, false, &device));
                let (e, n) = (f64s(ema.clone()), f64s(net.clone()));
                let got = f64s(ema_update(ema, net, beta));
                let (b, one_b) = (f64::from(beta as f32), f64::from((1.0 - beta) as f32));
                let want: Vec<f64> = e.iter().zip(&n).map(|(e, n)| e * b + n * one_b).collect();
                let tol: Vec<f64> = e.iter().zip(&n).map(|(e, n)| ROUNDING * ((e * b).abs() + (n * one_b).abs())).collect();
                assert_within(&format!("EMA {rows}x{cols} at beta {beta}"), &got, &want, &tol);
            }
        }
    }
}
