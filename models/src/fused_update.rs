//! The per-parameter updates of training as fused kernels: Adam's and AdamW's step, the EMA's
//! average and the gradient norm's sums of squares; a parallel pass per parameter on Burn's
//! flex CPU backend, a CubeCL kernel per 32 parameters on CUDA.
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
//! agrees to rounding. On CUDA one launch serves up to 32 tensors (a sequence of buffers,
//! the loop over them unrolled in the kernel), so a module's updates are queued
//! ([`UpdateQueue`]) and launched together at the end of its step; there the kernels write
//! over the weights and moments (or the EMA's tensors) where nothing else holds them, which
//! live in CubeCL's persistent pool ([`persistent`]).

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
    use burn::backend::{BackendTensor, Dispatch, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind, TensorMetadata};
    use burn::tensor::{DType, Shape};
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nhwc_to_nchw};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeBackend;

    /// Where value `i` of `t`, in the contiguous order of `t`'s shape, lies in `t`'s buffer
    /// (`t` a dense permutation of that order).
    #[cube]
    fn strided_offset(i: usize, t: &Tensor<f32>) -> usize {
        let rank = t.rank();
        let mut offset = 0usize;
        let mut rest = i;
        for k in 0..rank {
            let d = rank - 1 - k;
            offset += rest % t.shape(d) * t.stride(d);
            rest /= t.shape(d);
        }
        offset
    }

    /// The step on each of `params` and its moments `m1s`, `m2s`, written over them (at most
    /// [`BATCH`] tensors, one row of cubes each: cube (x, t) steps through tensor t's values
    /// from x), each value with the same operations in the same order as the flex kernel.
    /// The tensors of a launch share the step's constants; where `strided_grad`, their
    /// gradients are dense permutations of a contiguous layout (e.g. a convolution's weight
    /// gradient computed channels last), read where they lie instead of being copied first.
    /// The loop over the tensors is unrolled at compile time: CubeCL has no array of buffers,
    /// but a launch takes a sequence of them.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn adam_kernel(
        params: &mut Sequence<OwnedTensor<f32>>,
        grads: &Sequence<OwnedTensor<f32>>,
        m1s: &mut Sequence<OwnedTensor<f32>>,
        m2s: &mut Sequence<OwnedTensor<f32>>,
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
        let count = comptime![params.len()];
        let tensor = CUBE_POS_Y as usize;
        let first = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let step = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
        #[unroll]
        for t in 0..count {
            if tensor == t {
                let grad = grads.index(t);
                let param = params.index_mut(t);
                let m1 = m1s.index_mut(t);
                let m2 = m2s.index_mut(t);
                let mut i = first;
                while i < param.len() {
                    let mut at = i;
                    if strided_grad {
                        at = strided_offset(i, grad);
                    }
                    let g = grad[at];
                    let a = m1[i] * beta_1 + g * one_minus_beta_1;
                    let b = m2[i] * beta_2 + (g * g) * one_minus_beta_2;
                    let update = ((a * m1_scale) / m1_divisor) / (f32::sqrt(b / m2_divisor) + epsilon);
                    param[i] = param[i] * decay - update * lr;
                    m1[i] = a;
                    m2[i] = b;
                    i += step;
                }
            }
        }
    }

    /// For each of `xs` (at most [`BATCH`] tensors, each read in buffer order: contiguous or
    /// dense), `SQUARE_PARTS` cubes: cube (x, t) sums the squares of its threads' share of
    /// tensor t's values, added in the cube, into `partials[(first_slot + t) * SQUARE_PARTS + x]`.
    #[cube(launch)]
    fn square_sum_kernel(xs: &Sequence<OwnedTensor<f32>>, partials: &mut Tensor<f32>, first_slot: usize, #[comptime] threads: usize) {
        let count = comptime![xs.len()];
        let mut shared = Shared::new_slice(threads);
        let step = comptime!(crate::fused_update::SQUARE_PARTS * threads);
        let tensor = CUBE_POS_Y as usize;
        let mut acc = 0.0f32;
        #[unroll]
        for t in 0..count {
            if tensor == t {
                let x = xs.index(t);
                let mut i = CUBE_POS_X as usize * threads + UNIT_POS as usize;
                while i < x.len() {
                    acc += x[i] * x[i];
                    i += step;
                }
            }
        }
        // The branch above is the same for the whole cube: every thread reaches the sum.
        let total = crate::cube_group_norm::cube_sum(acc, &mut shared, threads);
        if UNIT_POS == 0 {
            partials[(first_slot + tensor) * comptime!(crate::fused_update::SQUARE_PARTS) + CUBE_POS_X as usize] = total;
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

    /// The average of each of `emas` (at most [`BATCH`] tensors, in rows of cubes as in
    /// [`adam_kernel`]) with its network tensor, written over it.
    #[cube(launch)]
    fn ema_kernel(emas: &mut Sequence<OwnedTensor<f32>>, nets: &Sequence<OwnedTensor<f32>>, beta: f32, one_minus_beta: f32) {
        let count = comptime![emas.len()];
        let tensor = CUBE_POS_Y as usize;
        let step = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
        #[unroll]
        for t in 0..count {
            if tensor == t {
                let net = nets.index(t);
                let ema = emas.index_mut(t);
                let mut i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
                while i < ema.len() {
                    ema[i] = ema[i] * beta + net[i] * one_minus_beta;
                    i += step;
                }
            }
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

    /// Tensors per launch of the batched kernels. Each tensor's code is unrolled into the
    /// kernel, and its buffers are kernel parameters: 7 x 32 pointers with their static
    /// metadata for Adam, within CUDA's parameter space. ImageNet-64's ADM (~600 tensors)
    /// takes ~20 launches per network and update instead of ~600.
    pub(crate) const BATCH: usize = 32;

    /// Cubes per tensor in a row of the batched Adam and EMA kernels at most (each thread then
    /// steps through its tensor).
    const MAX_CUBES_PER_TENSOR: usize = 4096;

    /// A Burn dispatch tensor on a CubeCL device, unwrapped.
    pub(crate) fn from_dispatch(t: FloatTensor<Dispatch>) -> CubeTensor {
        match t.kind {
            DispatchTensorKind::Cube(BackendTensor::Float(t)) => t,
            _ => panic!("fused_update: expected a float tensor on a CubeCL device"),
        }
    }

    pub(crate) fn into_dispatch(t: CubeTensor) -> FloatTensor<Dispatch> {
        DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Float(t)), autodiff: DispatchAutodiffContext::Disabled }
    }

    /// One tensor's Adam step for [`adam_launch`]: its tensors in the layouts the kernel reads,
    /// the parameter and moments its own (the kernel writes the step over them).
    #[derive(Clone)]
    pub(crate) struct AdamTensors {
        pub(crate) param: CubeTensor,
        grad: CubeTensor,
        pub(crate) m1: CubeTensor,
        pub(crate) m2: CubeTensor,
        pub(crate) strided_grad: bool,
    }

    /// A dense gradient in another layout than its parameter (a convolution's channels-last
    /// weight gradient) is read where it lies, unless `DMD_ADAM_GRAD=copy`: then it is copied
    /// into the parameter's layout first, as before 2026-11-27, to time which is faster on a
    /// GPU (reading in place saves a launch per weight, but its reads are strided).
    pub(crate) fn adam_tensors(param: CubeTensor, grad: CubeTensor, m1: CubeTensor, m2: CubeTensor) -> AdamTensors {
        static COPY_GRAD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let copy_grad = *COPY_GRAD.get_or_init(|| std::env::var("DMD_ADAM_GRAD").is_ok_and(|v| v == "copy"));
        let strided_grad = !copy_grad && grad.dtype == DType::F32 && !grad.is_contiguous() && is_dense(&grad);
        let grad = if strided_grad { grad } else { f32_contiguous(grad) };
        let [param, m1, m2] = [param, m1, m2].map(|t| owned(f32_contiguous(t)));
        AdamTensors { param, grad, m1, m2, strided_grad }
    }

    /// Copies `x` (contiguous) into `y` (truly contiguous, of its length).
    #[cube(launch)]
    fn copy_kernel(x: &Tensor<f32>, y: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i < y.len() {
            y[i] = x[i];
        }
    }

    /// `t` (contiguous) where no other tensor holds its buffer and it lies in CubeCL's
    /// persistent pool, else a copy there that nothing else holds. The update kernels write
    /// their results over their inputs, so an optimiser step allocates nothing for its weights
    /// and moments once they are its own (~1800 allocations and 3.5 GB held twice over per
    /// update of the ImageNet-64 ADM, where each step used to write three new tensors per
    /// parameter); and those, which live for the whole run, are kept out of the pages that
    /// activations are carved from ([`super::persistent`] says why). So a weight is copied at
    /// its first update when it is still shared (a generator's, initialised from the teacher)
    /// or was allocated elsewhere (a random initialisation, the moments' zeros, a resumed
    /// checkpoint's state), and never again.
    fn owned(t: CubeTensor) -> CubeTensor {
        let pool = super::persistent_pool_on();
        if t.can_mut() && t.is_contiguous() && (!pool || in_persistent_pool(&t)) {
            return t;
        }
        persistent_copy(t)
    }

    /// A copy of `t` (contiguous) in CubeCL's persistent pool (unless `DMD_PERSISTENT_POOL=off`).
    pub(crate) fn persistent_copy(t: CubeTensor) -> CubeTensor {
        let client = t.client.clone();
        let copy = if super::persistent_pool_on() { client.memory_persistent_allocation(&t, |t| empty(t, t.shape())) } else { empty(&t, t.shape()) };
        let (count, dim) = grid(&copy);
        copy_kernel::launch(&client, count, dim, t.into_tensor_arg(), copy.clone().into_tensor_arg());
        copy
    }

    /// Whether `t`'s buffer lies in CubeCL's persistent pool. Its reservation runs on CubeCL's
    /// device thread: until that thread has reached it, the location is unset and this says no
    /// (at worst an extra copy).
    pub(crate) fn in_persistent_pool(t: &CubeTensor) -> bool {
        let at = t.handle.memory.descriptor().location();
        at.init != 0 && at.pool == cubecl_runtime::memory_management::PERSISTENT_POOL_POS
    }

    /// The grid of a batched kernel over `tensors` (at most [`BATCH`]): a row of cubes per
    /// tensor, as many as the longest needs up to [`MAX_CUBES_PER_TENSOR`]. The cubes are
    /// one-dimensional, as the kernels index them (`UNIT_POS_X`, `CUBE_DIM_X`): CubeCL's
    /// `CubeDim::new` is two-dimensional (a plane of 32 threads by up to 8 planes on CUDA),
    /// under which every plane of a cube repeated the same values (8x the work, unnoticed
    /// while each value was written to a new tensor, not over its input).
    fn batch_grid(tensors: &[&CubeTensor]) -> (CubeCount, CubeDim) {
        let longest = tensors.iter().map(|t| t.shape().num_elements()).max().unwrap_or(1);
        let cube_dim = CubeDim::new_1d(CubeDim::new(&tensors[0].client, longest).num_elems());
        let per_tensor = longest.div_ceil(cube_dim.num_elems() as usize).clamp(1, MAX_CUBES_PER_TENSOR);
        (CubeCount::Static(per_tensor as u32, tensors.len() as u32, 1), cube_dim)
    }

    /// The steps of `tensors` (all with the same `strided_grad`), [`BATCH`] per launch.
    pub(crate) fn adam_launch(tensors: &[AdamTensors], s: super::AdamStep) {
        for chunk in tensors.chunks(BATCH) {
            let first = &chunk[0];
            let (count, dim) = batch_grid(&chunk.iter().map(|t| &t.param).collect::<Vec<_>>());
            let seq = |pick: fn(&AdamTensors) -> &CubeTensor| chunk.iter().map(|t| pick(t).clone().into_tensor_arg()).collect::<SequenceArg<OwnedTensor<f32>>>();
            adam_kernel::launch(
                &first.param.client,
                count,
                dim,
                seq(|t| &t.param),
                seq(|t| &t.grad),
                seq(|t| &t.m1),
                seq(|t| &t.m2),
                s.beta_1,
                1.0 - s.beta_1,
                s.beta_2,
                1.0 - s.beta_2,
                s.m1_scale,
                s.m1_divisor,
                s.m2_divisor,
                s.epsilon,
                s.decay,
                s.lr,
                first.strided_grad,
            );
        }
    }

    /// One tensor's average for [`ema_launch`]: its inputs contiguous and its output allocated.
    #[derive(Clone)]
    pub(crate) struct EmaTensors {
        pub(crate) ema: CubeTensor,
        net: CubeTensor,
    }

    pub(crate) fn ema_tensors(ema: CubeTensor, net: CubeTensor) -> EmaTensors {
        EmaTensors { ema: owned(f32_contiguous(ema)), net: f32_contiguous(net) }
    }

    /// The averages of `tensors`, [`BATCH`] per launch.
    pub(crate) fn ema_launch(tensors: &[EmaTensors], beta: f32, one_minus_beta: f32) {
        for chunk in tensors.chunks(BATCH) {
            let first = &chunk[0];
            let (count, dim) = batch_grid(&chunk.iter().map(|t| &t.ema).collect::<Vec<_>>());
            let seq = |pick: fn(&EmaTensors) -> &CubeTensor| chunk.iter().map(|t| pick(t).clone().into_tensor_arg()).collect::<SequenceArg<OwnedTensor<f32>>>();
            ema_kernel::launch(&first.ema.client, count, dim, seq(|t| &t.ema), seq(|t| &t.net), beta, one_minus_beta);
        }
    }

    /// Partial sums of squares [tensors, SQUARE_PARTS] of float32 `tensors` (at least one),
    /// [`BATCH`] tensors per launch.
    pub(crate) fn square_sums(tensors: Vec<CubeTensor>) -> CubeTensor {
        let partials = empty(&tensors[0], Shape::new([tensors.len(), super::SQUARE_PARTS]));
        square_sums_at(&partials, 0, tensors);
        partials
    }

    /// Writes the partial sums of squares of float32 `tensors` into rows `first_slot..` of
    /// `partials` [rows, SQUARE_PARTS] (contiguous strides; its buffer may be longer: CUDA
    /// rounds allocations up, which Burn's `is_contiguous_buffer` counts against it); a tensor
    /// that is neither contiguous nor dense is copied first.
    fn square_sums_at(partials: &CubeTensor, first_slot: usize, tensors: Vec<CubeTensor>) {
        assert!(partials.is_contiguous(), "square sums: the partial sums must be contiguous");
        let tensors: Vec<CubeTensor> = tensors
            .into_iter()
            .map(|x| {
                assert_eq!(x.dtype, DType::F32, "this crate's CubeCL kernels take float32 tensors");
                if is_dense(&x) { x } else { into_contiguous(x) }
            })
            .collect();
        for (k, chunk) in tensors.chunks(BATCH).enumerate() {
            let (_, dim, threads) = cube_per_unit(&chunk[0], super::SQUARE_PARTS);
            let count = CubeCount::Static(super::SQUARE_PARTS as u32, chunk.len() as u32, 1);
            let xs = chunk.iter().map(|x| x.clone().into_tensor_arg()).collect::<SequenceArg<OwnedTensor<f32>>>();
            square_sum_kernel::launch(&chunk[0].client, count, dim, xs, partials.clone().into_tensor_arg(), first_slot + k * BATCH, threads);
        }
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
            let t = adam_tensors(param, grad, m1, m2);
            adam_launch(std::slice::from_ref(&t), super::AdamStep { beta_1, beta_2, m1_scale, m1_divisor, m2_divisor, epsilon, decay, lr });
            (t.param, t.m1, t.m2)
        }

        fn ema_update(ema: FloatTensor<Self>, net: FloatTensor<Self>, beta: f32, one_minus_beta: f32) -> FloatTensor<Self> {
            let t = ema_tensors(ema, net);
            ema_launch(std::slice::from_ref(&t), beta, one_minus_beta);
            t.ema
        }

        fn square_sums_into(partials: FloatTensor<Self>, slot: usize, x: FloatTensor<Self>) -> FloatTensor<Self> {
            let partials = if partials.can_mut() { partials } else { partials.copy() };
            square_sums_at(&partials, slot, vec![x]);
            partials
        }
    }
}

/// `make()` with the CubeCL allocations it makes on `device` (a CubeCL device; elsewhere it
/// only runs `make`) in CubeCL's persistent pool: for tensors that live for a whole run
/// (weights, optimiser moments, an EMA). CubeCL 0.11's default pools carve all other
/// allocations from shared pages, and each reservation walks and coalesces the slices of every
/// page before one that fits, on the device thread that also launches the kernels; the
/// persistent pool finds an exact-size slot in a hash map. `tools/cubecl_pool_probe` (CubeCL's
/// memory manager on the host, the ImageNet-64 ADM's parameter sizes;
/// results/bench/cuda/host/) measured a training step's reservations at 6.9 us each with the
/// weights in the shared pages, 13-18 us with two Adam moments and an EMA as well, and 2.0 us
/// with all of those in the persistent pool; a forward's at 5.1 against 0.17 us.
/// `DMD_PERSISTENT_POOL=off` leaves everything in the shared pages, as before 2026-11-28 (to
/// compare on a GPU).
pub fn persistent<T: Send>(device: &Device, make: impl FnOnce() -> T + Send) -> T {
    if !persistent_pool_on() {
        return make();
    }
    let make = std::sync::Mutex::new(Some(make));
    device.memory_persistent_allocations((), |()| (make.lock().expect("not poisoned").take().expect("called once"))())
}

/// Whether [`persistent`] and the update kernels put tensors in CubeCL's persistent pool: unless
/// `DMD_PERSISTENT_POOL=off`, or CubeCL's config (a `cubecl.toml`) disables that pool (whose
/// windows then allocate elsewhere, and the updates would copy their tensors every time).
pub fn persistent_pool_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let asked = std::env::var("DMD_PERSISTENT_POOL").map_or(true, |v| v.trim() != "off");
        #[cfg(cube_kernels)]
        {
            use cubecl_runtime::config::{memory::PersistentMemory, CubeClRuntimeConfig, RuntimeConfig};
            asked && !matches!(CubeClRuntimeConfig::get().memory.persistent_memory, PersistentMemory::Disabled)
        }
        #[cfg(not(cube_kernels))]
        asked
    })
}

/// `t` with its values in CubeCL's persistent pool ([`persistent`]) where it is a float32
/// tensor on a CubeCL device (a copy unless it is there already); elsewhere `t` itself.
pub fn into_persistent_pool<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    #[cfg(cube_kernels)]
    if persistent_pool_on() && crate::nn::cube_kernels(&t.device()) && t.dtype() == DType::F32 {
        let c = cube::f32_contiguous(cube::from_dispatch(t.into_dispatch()));
        let c = if cube::in_persistent_pool(&c) { c } else { cube::persistent_copy(c) };
        return Tensor::from_dispatch(cube::into_dispatch(c));
    }
    t
}

/// Has CubeCL release the device memory its pools hold but no tensor uses (its explicit
/// cleanup; the next allocations that need it allocate again), on a device where this crate's
/// CubeCL kernels run; nothing elsewhere. For `dmd bench` (`DMD_BENCH_CLEANUP`): a forward pass
/// after training steps ran ~3x slower than before them on the H100 and the H200, and
/// whether the pools' state is the cause is what this tests.
pub fn release_unused_memory(device: &Device) {
    #[cfg(cube_kernels)]
    if crate::nn::cube_kernels(device) {
        let t = cube::from_dispatch(Tensor::<1>::zeros([1], device).into_dispatch());
        if let Err(e) = t.client.memory_cleanup() {
            eprintln!("note: CubeCL's memory cleanup refused: {e:?}");
        }
    }
    #[cfg(not(cube_kernels))]
    let _ = device;
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
/// Burn's dispatch primitives: `Tensor::into_dispatch`; all on `device`), with the partial sums
/// read back at once and added in float64 on the host: on a CubeCL device one kernel per
/// [`BATCH`](cube::BATCH) tensors, on flex one pass per tensor.
pub fn sum_of_squares(tensors: Vec<FloatTensor<Dispatch>>, device: &Device) -> f64 {
    if tensors.is_empty() {
        return 0.0;
    }
    #[cfg(cube_kernels)]
    let partials = if crate::nn::cube_kernels(device) {
        cube::into_dispatch(cube::square_sums(tensors.into_iter().map(cube::from_dispatch).collect()))
    } else {
        partial_sums_one_by_one(tensors, device)
    };
    #[cfg(not(cube_kernels))]
    let partials = partial_sums_one_by_one(tensors, device);
    Tensor::<2>::from_dispatch(partials).into_data().iter::<f32>().map(f64::from).sum()
}

fn partial_sums_one_by_one(tensors: Vec<FloatTensor<Dispatch>>, device: &Device) -> FloatTensor<Dispatch> {
    let mut partials = Tensor::<2>::zeros([tensors.len(), SQUARE_PARTS], device).into_dispatch();
    for (slot, x) in tensors.into_iter().enumerate() {
        partials = <Dispatch as UpdateBackend>::square_sums_into(partials, slot, x);
    }
    partials
}

/// Updates held back to run together: on a CubeCL device [`UpdateQueue::adam`] and
/// [`UpdateQueue::ema`] return the tensors an update will write and [`UpdateQueue::run`]
/// launches the queued updates, one kernel per [`BATCH`](cube::BATCH) tensors that share the
/// update's constants, instead of one per tensor (a launch costs ~30 us on the H100 here:
/// ~18 ms per Adam step of ImageNet-64's ADM, ~600 tensors). The returned tensors must not be
/// read before `run`: the optimiser and the EMA that queue a module's updates run them at the
/// end of the module's update. Elsewhere (flex) each update runs at once.
#[derive(Default)]
pub struct UpdateQueue {
    adam: Vec<QueuedAdam>,
    ema: Vec<QueuedEma>,
}

#[cfg(cube_kernels)]
type QueuedAdam = (cube::AdamTensors, AdamStep);
#[cfg(cube_kernels)]
type QueuedEma = (cube::EmaTensors, [f32; 2]);
// Without CubeCL kernels nothing is queued.
#[cfg(not(cube_kernels))]
type QueuedAdam = std::convert::Infallible;
#[cfg(not(cube_kernels))]
type QueuedEma = std::convert::Infallible;

impl UpdateQueue {
    /// Whether updates of `t` are queued (a tensor [`takes`] on a CubeCL device).
    pub fn queues<const D: usize>(t: &Tensor<D>) -> bool {
        takes(t) && crate::nn::cube_kernels(&t.device())
    }

    /// [`adam_update`]: (param, m1, m2), written by [`run`](Self::run) where
    /// [`queues`](Self::queues).
    pub fn adam<const D: usize>(&mut self, param: Tensor<D>, grad: Tensor<D>, m1: Tensor<D>, m2: Tensor<D>, s: AdamStep) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
        #[cfg(cube_kernels)]
        if Self::queues(&param) {
            let [param, grad, m1, m2] = [param, grad, m1, m2].map(|t| cube::from_dispatch(t.into_dispatch()));
            let t = cube::adam_tensors(param, grad, m1, m2);
            let [p, a, b] = [&t.param, &t.m1, &t.m2].map(|o| Tensor::from_dispatch(cube::into_dispatch(o.clone())));
            self.adam.push((t, s));
            return (p, a, b);
        }
        adam_update(param, grad, m1, m2, s)
    }

    /// [`ema_update`], written by [`run`](Self::run) where [`queues`](Self::queues).
    pub fn ema<const D: usize>(&mut self, ema: Tensor<D>, net: Tensor<D>, beta: f64) -> Tensor<D> {
        #[cfg(cube_kernels)]
        if Self::queues(&ema) {
            let t = cube::ema_tensors(cube::from_dispatch(ema.into_dispatch()), cube::from_dispatch(net.into_dispatch()));
            let out = Tensor::from_dispatch(cube::into_dispatch(t.ema.clone()));
            self.ema.push((t, [beta as f32, (1.0 - beta) as f32]));
            return out;
        }
        ema_update(ema, net, beta)
    }

    /// Launches the queued updates: those with the same constants (and, for Adam, gradient
    /// layout) together, in the order they came.
    pub fn run(&mut self) {
        #[cfg(cube_kernels)]
        {
            let key = |s: &AdamStep, strided: bool| ([s.beta_1, s.beta_2, s.m1_scale, s.m1_divisor, s.m2_divisor, s.epsilon, s.decay, s.lr].map(f32::to_bits), strided);
            for (s, tensors) in group_by(self.adam.drain(..), |(t, s)| key(s, t.strided_grad)) {
                cube::adam_launch(&tensors, s);
            }
            for ([beta, one_minus_beta], tensors) in group_by(self.ema.drain(..), |(_, b)| b.map(f32::to_bits)) {
                cube::ema_launch(&tensors, beta, one_minus_beta);
            }
        }
    }

    /// Updates queued and not yet run.
    pub fn len(&self) -> usize {
        self.adam.len() + self.ema.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `items` (tensors, constants) grouped by `key`, in order of first appearance.
#[cfg(cube_kernels)]
fn group_by<T, C: Copy, K: PartialEq>(items: impl Iterator<Item = (T, C)>, key: impl Fn(&(T, C)) -> K) -> Vec<(C, Vec<T>)> {
    let mut groups: Vec<(K, C, Vec<T>)> = Vec::new();
    for item in items {
        let k = key(&item);
        match groups.iter_mut().find(|(g, _, _)| *g == k) {
            Some((_, _, ts)) => ts.push(item.0),
            None => groups.push((k, item.1, vec![item.0])),
        }
    }
    groups.into_iter().map(|(_, c, ts)| (c, ts)).collect()
}

impl Drop for UpdateQueue {
    /// Updates are never left unwritten: their tensors may be alive elsewhere.
    fn drop(&mut self) {
        self.run();
    }
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

    const ADAM: AdamStep = AdamStep { beta_1: 0.9, beta_2: 0.999, m1_scale: 0.0316, m1_divisor: 1.0, m2_divisor: 1.0, epsilon: 3.2e-10, decay: 1.0, lr: 1e-3 };
    const ADAMW: AdamStep = AdamStep { beta_1: 0.0, beta_2: 0.99, m1_scale: 1.0, m1_divisor: 0.19, m2_divisor: 0.0199, epsilon: 1e-8, decay: 0.99999, lr: 2e-4 };

    /// A parameter, a gradient with zeros and its two moments (the second non-negative, with
    /// zeros where epsilon alone bounds the step), as `tensor` makes them.
    fn adam_inputs(rows: usize, cols: usize, seed: u64, transposed: bool, device: &Device) -> [Tensor<2>; 4] {
        let t = |k: u64, zeros| tensor(rows, cols, seed * 4 + k, transposed, zeros, device);
        [t(1, false), t(2, true), t(3, false), t(4, true).abs()]
    }

    /// The step's (param, m1, m2) from `inputs` against its definition in float64.
    fn assert_is_the_step(what: &str, s: AdamStep, inputs: [Tensor<2>; 4], got: (Tensor<2>, Tensor<2>, Tensor<2>)) {
        let [p, g, a, b] = inputs.map(f64s);
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
        let (new_p, new_a, new_b) = got;
        assert_within(&format!("{what}, parameter"), &f64s(new_p), &want[0], &tol[0]);
        assert_within(&format!("{what}, first moment"), &f64s(new_a), &want[1], &tol[1]);
        assert_within(&format!("{what}, second moment"), &f64s(new_b), &want[2], &tol[2]);
    }

    #[test]
    fn the_cubecl_adam_kernel_computes_the_step() {
        let device = Device::cpu();
        for (rows, cols, transposed) in SHAPES {
            for (name, s) in [("Adam", ADAM), ("AdamW", ADAMW)] {
                let inputs = adam_inputs(rows, cols, 0, transposed, &device);
                assert!(takes(&inputs[0]) && takes(&inputs[1]), "adam_update does not take tensors on {device:?}");
                let [param, grad, m1, m2] = inputs.clone();
                let got = adam_update(param, grad, m1, m2, s);
                assert_is_the_step(&format!("{name} {rows}x{cols}"), s, inputs, got);
            }
        }
    }

    /// Queued steps, more than one launch takes, of tensors of many sizes with contiguous and
    /// strided gradients and two sets of constants (four groups, launched apart), each give the
    /// step of its own tensor.
    #[test]
    fn queued_cubecl_adam_steps_are_each_tensors_step() {
        let device = Device::cpu();
        let mut queue = UpdateQueue::default();
        let mut steps = Vec::new();
        for k in 0..(2 * cube::BATCH + 7) as u64 {
            let (rows, cols) = (1 + (k as usize * 7) % 23, 1 + (k as usize * 13) % 37);
            let transposed = k % 3 == 0;
            let s = if k % 5 == 0 { ADAMW } else { ADAM };
            let inputs = adam_inputs(rows, cols, k, transposed, &device);
            assert!(UpdateQueue::queues(&inputs[0]), "UpdateQueue does not queue tensors on {device:?}");
            let [param, grad, m1, m2] = inputs.clone();
            let got = queue.adam(param, grad, m1, m2, s);
            steps.push((format!("queued step {k} ({rows}x{cols}, transposed {transposed})"), s, inputs, got));
        }
        assert_eq!(queue.len(), steps.len());
        queue.run();
        assert!(queue.is_empty());
        for (what, s, inputs, got) in steps {
            assert_is_the_step(&what, s, inputs, got);
        }
    }

    /// Steps over tensors nothing else holds (which the kernels write over) give the step, and
    /// a parameter, gradient or moment still held elsewhere keeps its values (the kernels
    /// write over a copy); with the queue and alone, and likewise the averages.
    #[test]
    fn cubecl_updates_write_over_only_unshared_tensors() {
        let device = Device::cpu();
        let host = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device);
        let mut queue = UpdateQueue::default();
        let (mut steps, mut kept) = (Vec::new(), Vec::new());
        for k in 0..8u64 {
            let inputs = adam_inputs(13 + k as usize, 29, k, false, &device);
            // Copies through the host (the step may write over the tensors themselves).
            let reference = [0, 1, 2, 3].map(|i| host(&inputs[i]));
            // Tensor k (param, grad, m1, m2) is also held here when k < 4.
            if k < 4 {
                kept.push((format!("held tensor {k}"), inputs[k as usize].clone(), host(&inputs[k as usize])));
            }
            let [param, grad, m1, m2] = inputs;
            let got = if k % 2 == 0 { queue.adam(param, grad, m1, m2, ADAM) } else { adam_update(param, grad, m1, m2, ADAM) };
            steps.push((format!("step {k}"), reference, got));
        }
        let mut averages = Vec::new();
        for (k, held) in [(9u64, false), (11, true)] {
            let [ema, net] = [tensor(31, 7, k, false, false, &device), tensor(31, 7, k + 1, false, false, &device)];
            let reference = [host(&ema), host(&net)];
            if held {
                kept.push(("held average".into(), ema.clone(), host(&ema)));
            }
            averages.push((reference, queue.ema(ema, net, 0.9)));
        }
        queue.run();
        for (what, reference, got) in steps {
            assert_is_the_step(&what, ADAM, reference, got);
        }
        for ([e, n], got) in averages {
            assert_is_the_average("average", 0.9, &f64s(e), &f64s(n), got);
        }
        for (what, held, values) in kept {
            assert_eq!(f64s(held), f64s(values), "{what} was written over");
        }
    }

    /// Where a tensor's buffer is: (CubeCL's id for it, whether it lies in the persistent pool),
    /// after the device thread has caught up.
    fn placement(t: &Tensor<2>) -> (usize, bool) {
        t.device().sync().expect("sync");
        let c = cube::from_dispatch(t.clone().into_dispatch());
        (c.handle.memory.descriptor().id.value, cube::in_persistent_pool(&c))
    }

    /// A weight and its moments, allocated in CubeCL's shared pages (as a random initialisation
    /// and the first step's zeros are), are in the persistent pool after their first update,
    /// alone or queued, and stay in the same buffers at the next (written over, not copied);
    /// likewise an average; `into_persistent_pool` moves a tensor there once; and a tensor
    /// made under `persistent` is there, one made after it is not.
    #[test]
    fn updated_weights_moments_and_averages_move_to_the_persistent_pool_once() {
        let device = Device::cpu();
        for queued in [false, true] {
            let inputs = adam_inputs(37, 41, 5, false, &device);
            assert!(!placement(&inputs[0]).1, "a new tensor is in the persistent pool already");
            let step = |[param, grad, m1, m2]: [Tensor<2>; 4]| {
                let mut queue = UpdateQueue::default();
                let got = if queued { queue.adam(param, grad, m1, m2, ADAM) } else { adam_update(param, grad, m1, m2, ADAM) };
                queue.run();
                got
            };
            let grad = inputs[1].clone();
            let (p, a, b) = step(inputs);
            let first = [&p, &a, &b].map(placement);
            assert!(first.iter().all(|&(_, persistent)| persistent), "queued {queued}: after the first step {first:?}");
            let (p, a, b) = step([p, grad, a, b]);
            assert_eq!([&p, &a, &b].map(placement), first, "queued {queued}: the second step moved a tensor");
        }
        let mut queue = UpdateQueue::default();
        let ema = queue.ema(tensor(31, 7, 1, false, false, &device), tensor(31, 7, 2, false, false, &device), 0.9);
        queue.run();
        let (id, persistent) = placement(&ema);
        assert!(persistent, "the average after its first update");
        assert_eq!(placement(&ema_update(ema, tensor(31, 7, 3, false, false, &device), 0.9)), (id, true), "the second average moved");
        let moved = into_persistent_pool(tensor(5, 3, 4, false, false, &device));
        let (id, persistent) = placement(&moved);
        assert!(persistent);
        assert_eq!(placement(&into_persistent_pool(moved)), (id, true), "moved twice");
        // As `weights::load_named` makes each weight.
        assert!(placement(&super::persistent(&device, || tensor(3, 4, 5, false, false, &device))).1, "a tensor made in a persistent window");
        assert!(!placement(&tensor(3, 4, 5, false, false, &device)).1, "the window stayed open");
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
        // More tensors than one launch takes (the later launches' rows), each scaled apart so
        // that a row lost or written twice shows.
        let many: Vec<Tensor<2>> = (0..2 * cube::BATCH + 5).map(|k| tensor(1 + k % 9, 2 + k % 17, k as u64, k % 4 == 0, false, &device).mul_scalar(1.0 + k as f64)).collect();
        let want: f64 = many.iter().map(|t| f64s(t.clone()).iter().map(|v| v * v).sum::<f64>()).sum();
        let got = sum_of_squares(many.into_iter().map(Tensor::into_dispatch).collect(), &device);
        assert!((got - want).abs() <= 1e-6 * want, "{} tensors: {got} against {want}", 2 * cube::BATCH + 5);
    }

    /// Queued averages, more than one launch takes, of tensors of many sizes (some networks'
    /// not contiguous) at two decays, each give its own tensor's average.
    #[test]
    fn queued_cubecl_averages_are_each_tensors_average() {
        let device = Device::cpu();
        let mut queue = UpdateQueue::default();
        let mut averages = Vec::new();
        for k in 0..(2 * cube::BATCH + 3) as u64 {
            let (rows, cols) = (1 + (k as usize * 5) % 29, 1 + (k as usize * 11) % 31);
            let beta = if k % 4 == 0 { 0.5 } else { 0.999 };
            let (ema, net) = (tensor(rows, cols, 2 * k, false, false, &device), tensor(rows, cols, 2 * k + 1, k % 3 == 0, false, &device));
            let (e, n) = (f64s(ema.clone()), f64s(net.clone()));
            averages.push((k, beta, e, n, queue.ema(ema, net, beta)));
        }
        assert_eq!(queue.len(), averages.len());
        queue.run();
        for (k, beta, e, n, got) in averages {
            assert_is_the_average(&format!("queued average {k} at beta {beta}"), beta, &e, &n, got);
        }
    }

    /// `got` against the average of `e` and `n` at `beta` in float64.
    fn assert_is_the_average(what: &str, beta: f64, e: &[f64], n: &[f64], got: Tensor<2>) {
        let (b, one_b) = (f64::from(beta as f32), f64::from((1.0 - beta) as f32));
        let want: Vec<f64> = e.iter().zip(n).map(|(e, n)| e * b + n * one_b).collect();
        let tol: Vec<f64> = e.iter().zip(n).map(|(e, n)| ROUNDING * ((e * b).abs() + (n * one_b).abs())).collect();
        assert_within(what, &f64s(got), &want, &tol);
    }

    #[test]
    fn the_cubecl_ema_kernel_computes_the_average() {
        let device = Device::cpu();
        for (rows, cols, transposed) in SHAPES {
            for beta in [0.0, 0.999, 0.99993] {
                let (ema, net) = (tensor(rows, cols, 5, false, false, &device), tensor(rows, cols, 6, transposed, false, &device));
                let (e, n) = (f64s(ema.clone()), f64s(net.clone()));
                assert_is_the_average(&format!("EMA {rows}x{cols} at beta {beta}"), beta, &e, &n, ema_update(ema, net, beta));
            }
        }
    }
}
