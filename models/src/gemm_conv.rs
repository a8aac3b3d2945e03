//! Burn's implicit-GEMM convolution kernels on CUDA, forward and both backward passes.
//!
//! Burn 0.22 without its `autotune` feature runs `conv2d` on CubeCL with `ConvStrategy::Direct`
//! (one thread per output value, no tensor cores), and its backward with the same kind of
//! fallback kernels. Its implicit-GEMM kernels (`ConvStrategy::ImplicitGemm`: a tiled matrix
//! product that gathers the input windows on the fly, on tensor cores) are only reached through
//! autotuning, whose first-use tuning took minutes here. This Burn backend extension calls them
//! directly: `gemm_conv2d` is one differentiable operation whose backward calls the
//! implicit-GEMM data- and weight-gradient kernels, so no im2col copy of the input is kept
//! (at stride > 1 Burn itself computes the data gradient with its direct transposed
//! convolution instead, without an error, so without our note).
//! On an H100 that made the ImageNet-64 ADM's training steps 2-2.7x faster than im2col and
//! its 3x3 convolutions as fast as PyTorch's (results/bench/cuda/README.md). Under Burn's
//! fusion feature the three are recorded as fusion operations (their `#[fusion]` shapes).
//! Two exceptions measured on an H100: the implicit-GEMM weight gradient is wrong for an input
//! of 3 channels, so inputs whose channels are not a multiple of 8 get the direct kernel for
//! it; and in bf16 the kernel with the bias in its epilogue is declined (shared memory), so
//! there the bias is a separate add.
//!
//! On the CPU backends the three methods are Burn's own `conv2d` and its two backward ops, so
//! the operation there equals `conv2d`; the tests use that to check the autodiff wiring.

#![allow(deprecated)] // burn-ndarray: kept for the deterministic tests

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, NdArray};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Shape, Tensor};

fn options(stride: usize, pad_h: usize, pad_w: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [pad_h, pad_w], [1, 1], 1)
}

/// Burn's own kernels: the three operations' default, and flex's for dtypes other than float32.
fn burn_conv2d<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<B> {
    B::conv2d(x, weight, None, options(stride, pad_h, pad_w))
}

fn burn_conv2d_x_backward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<B> {
    B::conv2d_x_backward(x, weight, grad, options(stride, pad_h, pad_w))
}

fn burn_conv2d_weight_backward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<B> {
    B::conv2d_weight_backward(x, weight, grad, options(stride, pad_h, pad_w))
}

/// The output shape of `gemm_conv2d` (for Burn's fusion, which records it before running, and
/// for cubek's kernels, which write into a tensor allocated for them).
#[cfg_attr(not(any(feature = "fusion", feature = "cuda", feature = "cube-cpu")), allow(dead_code))]
fn output_shape(x: &Shape, weight: &Shape, stride: &usize, pad_h: &usize, pad_w: &usize) -> Shape {
    let out = |size: usize, pad: usize, k: usize| (size + 2 * pad - k) / stride + 1;
    Shape::from([x[0], weight[0], out(x[2], *pad_h, weight[2]), out(x[3], *pad_w, weight[3])])
}

/// An ungrouped, bias-free 2-D convolution with zero padding `pad_h`, `pad_w`.
#[backend_extension(Flex, NdArray, Cube: cfg(any(feature = "cuda", feature = "cube-cpu")), Fusion: cfg(feature = "fusion"), Autodiff)]
pub trait GemmConvBackend: Backend {
    #[fusion(dtype = x, shape = output_shape(x, weight, stride, pad_h, pad_w))]
    fn gemm_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        burn_conv2d::<Self>(x, weight, stride, pad_h, pad_w)
    }

    /// The gradient for `x` given the output's gradient `grad`.
    #[fusion(dtype = x, shape = x)]
    fn gemm_conv2d_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        burn_conv2d_x_backward::<Self>(x, weight, grad, stride, pad_h, pad_w)
    }

    /// `weight` as the kernels read it, made once for the forward pass and kept for the input
    /// gradient: on CubeCL channels last (Burn's kernels compute in NHWC and would copy an NCHW
    /// weight at each call), elsewhere (fusion included: no recorded operation) `weight` itself.
    #[fusion(default)]
    fn gemm_conv2d_weight_layout(weight: FloatTensor<Self>) -> FloatTensor<Self> {
        weight
    }

    /// The gradient for `weight` given the output's gradient `grad`.
    #[fusion(dtype = weight, shape = weight)]
    fn gemm_conv2d_weight_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        burn_conv2d_weight_backward::<Self>(x, weight, grad, stride, pad_h, pad_w)
    }
}

/// Flex runs the three as `cpu_conv`'s blocked im2col products in float32 (other dtypes:
/// Burn's kernels).
impl GemmConvBackend for Flex {
    fn gemm_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        crate::cpu_conv::conv2d(&x, &weight, None, stride, pad_h, pad_w)
            .unwrap_or_else(|| burn_conv2d::<Self>(x, weight, stride, pad_h, pad_w))
    }

    fn gemm_conv2d_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        crate::cpu_conv::conv2d_x_backward(&x, &weight, &grad, stride, pad_h, pad_w)
            .unwrap_or_else(|| burn_conv2d_x_backward::<Self>(x, weight, grad, stride, pad_h, pad_w))
    }

    fn gemm_conv2d_weight_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        crate::cpu_conv::conv2d_weight_backward(&x, &weight, &grad, stride, pad_h, pad_w)
            .unwrap_or_else(|| burn_conv2d_weight_backward::<Self>(x, weight, grad, stride, pad_h, pad_w))
    }
}
impl GemmConvBackend for NdArray {}

#[cfg(any(feature = "cuda", feature = "cube-cpu"))]
mod cube {
    use super::{options, GemmConvBackend};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::TensorMetadata;
    use burn_cubecl::kernel::cast;
    use burn_cubecl::kernel::conv::{conv_data_backward, conv_forward, conv_weight_backward, ConvStrategy};
    use burn::tensor::DType;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::Shape;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nchw_to_nhwc_shape};
    #[cfg(cube_kernels)]
    use crate::fused_update::cube::channels_last;
    use burn_cubecl::CubeBackend;
    use cubek::convolution::components::ConvSetupError;
    use std::fmt::Debug;
    use std::sync::{Mutex, OnceLock};

    /// One pass of a convolution, for choosing its implicit-GEMM algorithm.
    #[derive(Clone, Copy)]
    enum Pass {
        Forward,
        Data,
        Weight,
    }

    /// How a pass of the convolutions runs.
    #[derive(Clone)]
    enum Choice {
        /// Burn's launcher of its `ImplicitGemm` (cubek's `sync` on CMMA tiles).
        Burn,
        /// cubek's kernel with this strategy, launched here.
        Cubek(cubek::convolution::Strategy),
        /// The weight gradient by [`weight_gradient_by_columns`] (where it applies).
        Columns,
    }

    /// The choice for `pass` from `DMD_CONV_FWD`, `DMD_CONV_DGRAD` or `DMD_CONV_WGRAD`: `sync`,
    /// `async` or `tma`, with `-mma` for MMA instead of CMMA tiles (the six Burn's autotune
    /// would try), or `im2col` for the weight gradient; read once. Unset: Burn's, the measured
    /// default: on an H200 cubek declined every `async` and `tma` kernel ("Async barrier
    /// instructions are not available on the current device", so Burn's direct kernels ran, 7x
    /// slower) and `sync-mma` was no faster (h200/run14).
    fn choice(pass: Pass) -> Choice {
        use cubek::convolution::{AcceleratedTileKind, ConvAlgorithm, Strategy};
        static CHOSEN: [OnceLock<Choice>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let (slot, var) = match pass {
            Pass::Forward => (0, "DMD_CONV_FWD"),
            Pass::Data => (1, "DMD_CONV_DGRAD"),
            Pass::Weight => (2, "DMD_CONV_WGRAD"),
        };
        CHOSEN[slot]
            .get_or_init(|| {
                let Ok(raw) = std::env::var(var) else {
                    return Choice::Burn;
                };
                let (name, mma) = raw.strip_suffix("-mma").map_or((raw.as_str(), false), |name| (name, true));
                let algorithm = match (name, mma) {
                    ("sync", false) => ConvAlgorithm::SimpleSyncCyclic,
                    ("sync", true) => ConvAlgorithm::SimpleSyncStrided,
                    ("async", false) => ConvAlgorithm::SimpleAsyncCyclic,
                    ("async", true) => ConvAlgorithm::SimpleAsyncStrided,
                    // cubek has no TMA kernel for the input gradient (it would decline to
                    // Burn's direct kernel at every convolution).
                    ("tma", _) if !matches!(pass, Pass::Data) => ConvAlgorithm::SimpleAsyncTma,
                    ("im2col", false) if matches!(pass, Pass::Weight) => return Choice::Columns,
                    _ => {
                        eprintln!("warning: {var}={raw:?} ignored: expected sync, async or tma (not for the input gradient), optionally with -mma, or im2col for the weight gradient");
                        return Choice::Burn;
                    }
                };
                let tile_kind = if mma { AcceleratedTileKind::Mma } else { AcceleratedTileKind::Cmma };
                Choice::Cubek(Strategy::Inferred { algorithm, tile_kind })
            })
            .clone()
    }

    /// cubek's strategy for `pass`, where [`choice`] names one.
    fn algorithm(pass: Pass) -> Option<cubek::convolution::Strategy> {
        match choice(pass) {
            Choice::Cubek(strategy) => Some(strategy),
            Choice::Burn | Choice::Columns => None,
        }
    }

    /// cubek's convolution with `strategy` of `lhs` and `rhs` (channels last, as Burn's CubeCL
    /// convolutions take them) into a new truly contiguous channels-last `out` [shape, dtype]
    /// (Burn's launchers pad rows whose bytes are not a multiple of the alignment; cubek
    /// writes through the output's strides either way), returned as an NCHW view.
    fn launch(
        strategy: &cubek::convolution::Strategy,
        o: &ConvOptions<2>,
        lhs: CubeTensor,
        rhs: CubeTensor,
        out: (Shape, DType),
        inputs: impl FnOnce(cubek::std::InputBinding, cubek::std::InputBinding, burn_cubecl::cubecl::prelude::TensorBinding) -> cubek::convolution::ConvolutionInputs,
    ) -> Result<CubeTensor, ConvSetupError> {
        use burn::backend::cubecl::dtype_to_storage_type as storage;
        use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
        let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(lhs.client.clone(), lhs.device.clone(), out.0, out.1);
        let client = lhs.client.clone();
        let dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: storage(lhs.dtype), rhs: storage(rhs.dtype), out: storage(out.dtype) });
        let args = cubek::convolution::ConvolutionArgs { stride: o.stride, padding: o.padding_begin(), dilation: o.dilation };
        cubek::convolution::launch_ref::<2>(strategy, &client, inputs(input(lhs), input(rhs), out.clone().binding()), args, dtypes)?;
        Ok(burn_cubecl::ops::permute_nhwc_to_nchw(out))
    }

    fn input(t: CubeTensor) -> cubek::std::InputBinding {
        let dtype = burn::backend::cubecl::dtype_to_storage_type(t.dtype);
        cubek::std::InputBinding::new(t.binding(), dtype)
    }

    /// The forward convolution with `s`: cubek's kernel of `DMD_CONV_FWD` where that is set and
    /// `s` is the implicit GEMM, else Burn's.
    fn forward(x: CubeTensor, weight: CubeTensor, bias: Option<CubeTensor>, o: &ConvOptions<2>, s: ConvStrategy) -> Result<CubeTensor, ConvSetupError> {
        let (ConvStrategy::ImplicitGemm, Some(strategy)) = (&s, algorithm(Pass::Forward)) else {
            return conv_forward::<2>(x, weight, bias, o.clone(), s);
        };
        // `options` pads each side alike and strides both dimensions alike.
        let [pad_h, pad_w] = o.padding_begin();
        let y = (permute_nchw_to_nhwc_shape(super::output_shape(&x.shape(), &weight.shape(), &o.stride[0], &pad_h, &pad_w)), x.dtype);
        let (x, weight) = (permute_nchw_to_nhwc(x), permute_nchw_to_nhwc(weight));
        launch(&strategy, o, x, weight, y, |input, weight, out| cubek::convolution::ConvolutionInputs::Forward { input, weight, bias: bias.map(self::input), out })
    }

    /// The input gradient with `s`: cubek's kernel of `DMD_CONV_DGRAD` where that is set, `s` is
    /// the implicit GEMM and the stride 1 (Burn's own rule), else Burn's.
    fn data_gradient(grad: CubeTensor, weight: CubeTensor, x_shape: Shape, o: &ConvOptions<2>, s: ConvStrategy) -> Result<CubeTensor, ConvSetupError> {
        let (ConvStrategy::ImplicitGemm, Some(strategy), [1, 1]) = (&s, algorithm(Pass::Data), o.stride) else {
            return conv_data_backward::<2>(grad, weight, x_shape, o.clone(), s);
        };
        let dx = (permute_nchw_to_nhwc_shape(x_shape), grad.dtype);
        launch(&strategy, o, permute_nchw_to_nhwc(grad), permute_nchw_to_nhwc(weight), dx, |out_grad, weights, in_grad| cubek::convolution::ConvolutionInputs::BackwardData { out_grad, weights, in_grad })
    }

    /// The weight gradient with `s`: cubek's kernel of `DMD_CONV_WGRAD` where that is set and
    /// `s` is the implicit GEMM, else Burn's.
    fn weight_gradient_with(x: CubeTensor, grad: CubeTensor, weight: Shape, o: &ConvOptions<2>, s: ConvStrategy) -> Result<CubeTensor, ConvSetupError> {
        let (ConvStrategy::ImplicitGemm, Some(strategy)) = (&s, algorithm(Pass::Weight)) else {
            return conv_weight_backward::<2>(x, grad, weight, o.clone(), s);
        };
        let dw = (permute_nchw_to_nhwc_shape(weight), grad.dtype);
        launch(&strategy, o, permute_nchw_to_nhwc(x), permute_nchw_to_nhwc(grad), dw, |input, out_grad, weight_grad| cubek::convolution::ConvolutionInputs::BackwardWeight { input, out_grad, weight_grad })
    }

    /// Whether `DMD_CONV_WGRAD=im2col` asks for [`weight_gradient_by_columns`]. Not the
    /// default: on an H200 it saved 14 ms of the ImageNet-64 ADM's 159 ms teacher-step backward
    /// but raised the GPU memory of `dmd bench` at batch 8 from 17.8 to 25.2 GiB (CubeCL's pools
    /// grew pages to the columns' size; results/bench/cuda/README.md).
    fn columns_for_weight_gradient() -> bool {
        matches!(choice(Pass::Weight), Choice::Columns)
    }

    /// The columns kernel (a module of its own for CubeCL's prelude, whose names clash).
    mod columns {
        use burn_cubecl::cubecl;
        use burn_cubecl::cubecl::prelude::*;

        /// Columns `cols` [N Ho Wo, kh kw C] of `x` [N, C, H, W] (any strides) for a stride-1
        /// convolution with zero padding `pad_h`, `pad_w`: row (n, oy, ox), column (ky, kx, c) is
        /// x[n, c, oy + ky - pad_h, ox + kx - pad_w], zero outside (the weight's channels-last
        /// order [O, kh, kw, C], so that cols' product with the output gradient is that layout).
        #[cube(launch)]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn im2col_kernel<E: Numeric>(x: &Tensor<E>, cols: &mut Tensor<E>, kernel_w: usize, pad_h: usize, pad_w: usize, out_h: usize, out_w: usize, #[define(E)] _dtype: ElemType) {
            let i = ABSOLUTE_POS;
            if i < cols.len() {
                let channels = x.shape(1);
                let width = cols.shape(1);
                let (row, col) = (i / width, i % width);
                let (tap, c) = (col / channels, col % channels);
                let (ky, kx) = (tap / kernel_w, tap % kernel_w);
                let (ox, rest) = (row % out_w, row / out_w);
                let (oy, n) = (rest % out_h, rest / out_h);
                // Unsigned: the padded position, compared before the padding is taken off.
                let (iy, ix) = (oy + ky, ox + kx);
                let mut v = E::from_int(0);
                if iy >= pad_h && ix >= pad_w && iy - pad_h < x.shape(2) && ix - pad_w < x.shape(3) {
                    v = x[n * x.stride(0) + c * x.stride(1) + (iy - pad_h) * x.stride(2) + (ix - pad_w) * x.stride(3)];
                }
                cols[i] = v;
            }
        }
    }

    /// Into how many equal pieces the weight gradient's contraction over `rows` = N Ho Wo is
    /// cut: a power of two dividing `rows`, each piece at least 2048 rows, at most 64 pieces.
    fn contraction_pieces(rows: usize) -> usize {
        let most = (rows / 2048).clamp(1, 64);
        (0..=most.ilog2()).rev().map(|p| 1usize << p).find(|s| rows % s == 0).unwrap_or(1)
    }

    /// Bytes of columns [`weight_gradient_by_columns`] materialises at once at most: larger
    /// batches are taken a few images at a time, their gradients added (at batch 8 in float32
    /// the ImageNet-64 ADM's largest columns are 453 MB, one piece; at batch 40 in bf16, 1.1 GB).
    const COLUMNS_BUDGET: usize = 512 << 20;

    /// The weight gradient of a stride-1 convolution as a matrix product with the contraction
    /// cut into pieces, [S, O, N Ho Wo / S] x [S, N Ho Wo / S, kh kw C], summed over S: the
    /// implicit GEMM gives each output tile the whole contraction (N H W: 32768 rows at
    /// 64x64, batch 8) over few tiles (O x 9 C), which leaves most of a GPU idle; the pieces
    /// multiply the work items by S at the cost of the columns (N Ho Wo x 9 C values, at most
    /// [`COLUMNS_BUDGET`] at a time) and a small sum. On an H200 it took the ImageNet-64 ADM's
    /// teacher-step backward from 159 to 145 ms, at a cost in memory (see
    /// `columns_for_weight_gradient`). Returned channels last [O, C, kh, kw] like the implicit
    /// GEMM's. `None` for other strides.
    pub(crate) fn weight_gradient_by_columns(x: &CubeTensor, grad: &CubeTensor, weight: &Shape, o: &ConvOptions<2>) -> Option<CubeTensor> {
        weight_gradient_by_columns_within(x, grad, weight, o, COLUMNS_BUDGET)
    }

    /// [`weight_gradient_by_columns`] with at most `budget` bytes of columns at once.
    pub(crate) fn weight_gradient_by_columns_within(x: &CubeTensor, grad: &CubeTensor, weight: &Shape, o: &ConvOptions<2>, budget: usize) -> Option<CubeTensor> {
        use burn::backend::ops::FloatTensorOps;
        use burn::tensor::Slice;
        type B = CubeBackend;
        if o.stride != [1, 1] || o.dilation != [1, 1] || o.groups != 1 || x.dtype != grad.dtype {
            return None;
        }
        let [n, c, _, _] = x.shape().dims();
        let [out, _, kh, kw] = weight.dims();
        let [_, _, ho, wo] = grad.shape().dims();
        let width = kh * kw * c;
        let images_at_once = (budget / (ho * wo * width * x.dtype.size()).max(1)).clamp(1, n);
        // [N, Ho, Wo, O] rows (a view where the gradient is channels last).
        let grad_rows = permute_nchw_to_nhwc(grad.clone());
        let [pad_h, pad_w] = o.padding_begin();
        let mut dw: Option<CubeTensor> = None;
        for first in (0..n).step_by(images_at_once) {
            let images = images_at_once.min(n - first);
            let batch = |t: &CubeTensor| match images == n {
                true => t.clone(),
                false => B::float_slice(t.clone(), &[Slice::from(first..first + images)]),
            };
            let rows = images * ho * wo;
            let cols = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::from([rows, width]), x.dtype);
            let (count, dim) = crate::fused_update::cube::grid(&cols);
            columns::im2col_kernel::launch(
                &x.client,
                count,
                dim,
                batch(x).into_tensor_arg(),
                cols.clone().into_tensor_arg(),
                kw,
                pad_h,
                pad_w,
                ho,
                wo,
                burn::backend::cubecl::dtype_to_storage_type(x.dtype),
            );
            let pieces = contraction_pieces(rows);
            let per = rows / pieces;
            let g = B::float_swap_dims(B::float_reshape(batch(&grad_rows), Shape::from([pieces, per, out])), 1, 2);
            let partial = B::float_matmul(g, B::float_reshape(cols, Shape::from([pieces, per, width])));
            let part = if pieces > 1 { B::float_sum_dim(partial, 0) } else { partial };
            dw = Some(match dw {
                Some(sum) => B::float_add(sum, part),
                None => part,
            });
        }
        let dw = dw.expect("a batch of at least one image");
        Some(burn_cubecl::ops::permute_nhwc_to_nchw(B::float_reshape(dw, Shape::from([out, kh, kw, c]))))
    }

    /// `run` with the implicit-GEMM kernel, or `None` where its setup declines the shapes or
    /// dtype (an error), noting that on stderr once per operation and convolution, and
    /// declining at once from then on (a declined attempt can cost copies of its inputs
    /// before it fails).
    fn try_implicit_gemm<T, E: Debug>(op: &str, x: &CubeTensor, weight: &Shape, o: &ConvOptions<2>, run: impl Fn(ConvStrategy) -> Result<T, E>) -> Option<T> {
        static DECLINED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let what = format!("input {:?} ({:?}, strides {:?}), weight {:?}, stride {:?}, padding {:?}", x.shape(), x.dtype, x.meta.strides(), weight, o.stride, o.padding);
        let key = format!("{op} {what}");
        if DECLINED.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            return None;
        }
        run(ConvStrategy::ImplicitGemm)
            .map_err(|err| {
                eprintln!("note: implicit-GEMM {op} declined {what} ({err:?}); using another kernel for it");
                DECLINED.lock().unwrap_or_else(|e| e.into_inner()).push(key);
            })
            .ok()
    }

    /// `run` with Burn's direct kernel.
    fn direct<T, E: Debug>(op: &str, x: &CubeTensor, run: impl Fn(ConvStrategy) -> Result<T, E>) -> T {
        run(ConvStrategy::Direct).unwrap_or_else(|e| panic!("direct {op} of input {:?}: {e:?}", x.shape()))
    }

    /// `run` with the implicit-GEMM kernel, with Burn's direct kernel where it declines.
    fn implicit_gemm_or_direct<T, E: Debug>(op: &str, x: &CubeTensor, weight: &Shape, o: &ConvOptions<2>, run: impl Fn(ConvStrategy) -> Result<T, E>) -> T {
        try_implicit_gemm(op, x, weight, o, &run).unwrap_or_else(|| direct(op, x, &run))
    }

    /// The weight gradient. Burn's implicit-GEMM weight gradient is wrong for an input of 3
    /// channels (relative L2 error 0.59 against the CPU on an H100, float32; 2.6e-4 with 32
    /// and more), so a convolution whose input channels are not a multiple of 8 (a network's
    /// first, on images or latents: one small weight) gets Burn's direct kernel, in float32
    /// whatever the dtype (the direct kernel sums in its dtype, over all N H W positions).
    fn weight_gradient(x: &CubeTensor, grad: &CubeTensor, weight: &Shape, o: &ConvOptions<2>) -> CubeTensor {
        if weight[1] % 8 == 0 {
            if let Some(dw) = columns_for_weight_gradient().then(|| weight_gradient_by_columns(x, grad, weight, o)).flatten() {
                return dw;
            }
            return implicit_gemm_or_direct("weight gradient", x, weight, o, |s| weight_gradient_with(x.clone(), grad.clone(), weight.clone(), o, s));
        }
        let f32 = |t: &CubeTensor| if t.dtype == DType::F32 { t.clone() } else { cast(t.clone(), DType::F32) };
        let (x32, grad32) = (f32(x), f32(grad));
        let dw = direct("weight gradient", x, |s| conv_weight_backward::<2>(x32.clone(), grad32.clone(), weight.clone(), o.clone(), s));
        if grad.dtype == DType::F32 { dw } else { cast(dw, grad.dtype) }
    }

    /// The convolution with its bias in the implicit-GEMM kernel's epilogue (no separate
    /// full-size add), and the bias gradient as one reduction over the output gradient's
    /// channels-last rows [N H W, O] (which the weight gradient then reads without a copy),
    /// instead of Burn's broadcast add and its sums over batch and pixels.
    #[cfg(cube_kernels)]
    impl crate::cpu_conv::ConvBiasBackend for CubeBackend {
        fn conv2d_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            // Where the kernel with the bias declines (in bf16 it asked for more shared memory
            // than an H100 has), the kernel without it and a broadcast add.
            try_implicit_gemm("convolution with bias", &x, &weight.shape(), &o, |s| forward(x.clone(), weight.clone(), Some(bias.clone()), &o, s)).unwrap_or_else(|| {
                use burn::backend::ops::FloatTensorOps;
                let out = bias.shape()[0];
                let y = <Self as GemmConvBackend>::gemm_conv2d(x, weight, stride, pad_h, pad_w);
                Self::float_add(y, Self::float_reshape(bias, Shape::from([1, out, 1, 1])))
            })
        }

        fn conv2d_bias_param_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
            use burn::backend::ops::FloatTensorOps;
            let o = options(stride, pad_h, pad_w);
            let grad = channels_last(grad);
            let dw = weight_gradient(&x, &grad, &weight.shape(), &o);
            // The sum over the N H W rows in two steps, [rows / k, k, O] summed over k, then over
            // the rest: without Burn's autotune, its reduction gives each output one thread, so
            // a single sum would run O threads over all rows.
            let [n, out, h, w] = grad.shape().dims();
            let rows = n * h * w;
            let k = crate::nn::gcd(rows, 256);
            let blocks = Self::float_reshape(permute_nchw_to_nhwc(grad), Shape::from([rows / k, k, out]));
            let db = Self::float_sum_dim(Self::float_sum_dim(blocks, 1), 0);
            (dw, Self::float_reshape(db, Shape::from([out])))
        }
    }

    impl GemmConvBackend for CubeBackend {
        // Under Burn's fusion (no `cube_kernels`) the default: the kernels copy at each call.
        #[cfg(cube_kernels)]
        fn gemm_conv2d_weight_layout(weight: FloatTensor<Self>) -> FloatTensor<Self> {
            channels_last(weight)
        }

        fn gemm_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            implicit_gemm_or_direct("convolution", &x, &weight.shape(), &o, |s| forward(x.clone(), weight.clone(), None, &o, s))
        }

        fn gemm_conv2d_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            implicit_gemm_or_direct("input gradient", &x, &weight.shape(), &o, |s| data_gradient(grad.clone(), weight.clone(), x.shape(), &o, s))
        }

        fn gemm_conv2d_weight_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            weight_gradient(&x, &grad, &weight.shape(), &o)
        }
    }
}

/// The backward pass: both gradients from the inner backend's kernels, from the saved input
/// and the weight in the kernels' layout (no im2col copy kept).
#[derive(Debug)]
struct GemmConvBackward;

impl<B: Backend + GemmConvBackend> Backward<B, 2> for GemmConvBackward {
    type State = (NodeId, B::FloatTensorPrimitive, [usize; 3]);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight, [stride, ph, pw]) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::gemm_conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), stride, ph, pw));
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, B::gemm_conv2d_weight_backward(x, weight, grad, stride, ph, pw));
        }
    }
}

impl<B: Backend + GemmConvBackend, C: CheckpointStrategy> GemmConvBackend for Autodiff<B, C> {
    fn gemm_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        match GemmConvBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let weight = B::gemm_conv2d_weight_layout(weight.into_parts().0);
                let state = (prep.checkpoint(&x), weight.clone(), [stride, pad_h, pad_w]);
                let out = B::gemm_conv2d(x.into_parts().0, weight, stride, pad_h, pad_w);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gemm_conv2d(x.into_parts().0, weight.into_parts().0, stride, pad_h, pad_w)),
        }
    }
}

/// `x` [N, C, H, W] convolved with `weight` [O, C, kh, kw] at `stride` with zero padding
/// `[top and bottom, left and right]`, through `GemmConvBackend` (differentiable).
pub fn gemm_conv2d(x: Tensor<4>, weight: Tensor<4>, stride: usize, padding: [usize; 2]) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as GemmConvBackend>::gemm_conv2d(x.into_dispatch(), weight.into_dispatch(), stride, padding[0], padding[1]))
}

/// The convolution with its bias on CubeCL's CPU runtime (`--features cube-cpu`, see
/// `fused_update`'s tests) against flex's (`cpu_conv`, which its tests check against the
/// definition), through `nn::conv2d_dense` and autodiff. The CPU runtime has no implicit-GEMM
/// kernel (Burn's direct kernels run, after our note), so this checks the bias's routing,
/// its gradient and the layouts, not the CUDA kernels.
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use crate::cpu_group_norm::tests::{rel_error, values};
    use crate::cube_group_norm::cube_tests::{channels_last, is_channels_last};
    use crate::nn::conv2d_dense;
    use burn::tensor::{Device, Tensor, TensorData};

    /// A bf16 convolution with 3 input channels: its weight gradient goes to Burn's direct
    /// kernel in float32 (the casts around it), so it is the float32 gradient of the same bf16
    /// values, rounded once to bf16.
    #[test]
    fn a_bf16_weight_gradient_of_few_channels_is_summed_in_float32() {
        use burn::tensor::FloatDType;
        let (n, c, o, h, w) = (4, 3, 16, 12, 12);
        let run = |device: &Device, dtype: FloatDType| {
            let ad = device.clone().autodiff();
            // Values exact in bf16, so both devices start from the same numbers.
            let bf16_exact = |v: Vec<f32>| v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect::<Vec<_>>();
            let x = Tensor::<4>::from_data(TensorData::new(bf16_exact(values(n * c * h * w, 1, 2.0, 0.0)), [n, c, h, w]), &ad).cast(dtype);
            let weight = Tensor::<4>::from_data(TensorData::new(bf16_exact(values(o * c * 9, 2, 1.0, 0.0)), [o, c, 3, 3]), &ad).cast(dtype).require_grad();
            let dy = Tensor::<4>::from_data(TensorData::new(bf16_exact(values(n * o * h * w, 4, 2.0, 0.0)), [n, o, h, w]), &ad).cast(dtype);
            let grads = (conv2d_dense(x, weight.clone(), None, 1, [1, 1]).cast(dtype) * dy).sum().backward();
            weight.grad(&grads).unwrap().cast(FloatDType::F32).into_data().try_to_vec::<f32>().unwrap()
        };
        let want: Vec<f64> = run(&Device::flex(), FloatDType::F32).into_iter().map(f64::from).collect();
        let got = run(&Device::cpu(), FloatDType::BF16);
        // One bf16 rounding of each value: relative error below 2^-8; a sum kept in bf16 over
        // the 576 positions would be far above.
        let error = rel_error(&got, &want);
        assert!(error < 4e-3, "relative error {error}");
    }

    /// The weight gradient by columns and a cut contraction (`DMD_CONV_WGRAD=im2col`) is flex's weight
    /// gradient: 3x3 and 4x4 kernels, with and without padding, inputs channels first and
    /// last, contractions of 2 and 4 pieces and uncut, and the batch taken whole, 3 images at
    /// a time (the last 2) and one at a time.
    #[test]
    fn the_weight_gradient_by_columns_is_the_flex_one() {
        use super::cube::weight_gradient_by_columns_within;
        use crate::fused_update::cube::{from_dispatch, into_dispatch};
        // (n, c, o, h, w, kernel, padding, x channels last, images at once)
        let cases = [(4, 8, 6, 32, 32, 3, 1, false, 4), (8, 8, 6, 32, 32, 3, 1, true, 8), (2, 16, 5, 13, 11, 3, 1, true, 2), (4, 8, 3, 35, 35, 4, 0, false, 4), (16, 8, 4, 16, 16, 3, 0, true, 16), (5, 8, 6, 12, 12, 3, 1, true, 3), (3, 8, 4, 9, 9, 3, 1, false, 1)];
        for (n, c, o, h, w, k, pad, x_last, at_once) in cases {
            let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
            let (xv, wv, dyv) = (values(n * c * h * w, 1, 2.0, 0.0), values(o * c * k * k, 2, 1.0, 0.0), values(n * o * ho * wo, 3, 2.0, 0.0));
            let want: Vec<f64> = {
                let ad = Device::flex().autodiff();
                let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [n, c, h, w]), &ad);
                let weight = Tensor::<4>::from_data(TensorData::new(wv.clone(), [o, c, k, k]), &ad).require_grad();
                let dy = Tensor::<4>::from_data(TensorData::new(dyv.clone(), [n, o, ho, wo]), &ad);
                let grads = (conv2d_dense(x, weight.clone(), None, 1, [pad, pad]) * dy).sum().backward();
                weight.grad(&grads).unwrap().into_data().iter::<f32>().map(f64::from).collect()
            };
            let device = Device::cpu();
            let x = match x_last {
                true => channels_last(&xv, [n, c, h, w], &device),
                false => Tensor::<4>::from_data(TensorData::new(xv, [n, c, h, w]), &device),
            };
            let dy = Tensor::<4>::from_data(TensorData::new(dyv, [n, o, ho, wo]), &device);
            let budget = at_once * ho * wo * k * k * c * 4;
            let dw = weight_gradient_by_columns_within(&from_dispatch(x.into_dispatch()), &from_dispatch(dy.into_dispatch()), &[o, c, k, k].into(), &super::options(1, pad, pad), budget).expect("stride 1");
            let dw = Tensor::<4>::from_dispatch(into_dispatch(dw));
            assert_eq!(dw.dims(), [o, c, k, k]);
            let got = dw.into_data().iter::<f32>().collect::<Vec<_>>();
            let error = rel_error(&got, &want);
            assert!(error < 2e-6, "case {:?}: relative error {error}", (n, c, o, h, w, k, pad, x_last, at_once));
        }
    }

    #[test]
    fn the_cubecl_convolution_with_bias_is_the_flex_one() {
        // (n, c, o, h, w, kernel, stride, padding), each with the input and the output's
        // gradient in memory channels first or last.
        let cases = [(2, 5, 7, 6, 5, 3, 1, 1), (3, 8, 4, 8, 8, 4, 2, 1), (2, 4, 6, 5, 5, 3, 1, 0)];
        for ((n, c, o, h, w, k, stride, pad), (x_last, dy_last)) in cases.into_iter().flat_map(|case| [(false, false), (true, true), (true, false), (false, true)].map(|v| (case, v))) {
            let (ho, wo) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
            let run = |device: &Device| {
                let ad = device.clone().autodiff();
                let tensor = |values: Vec<f32>, shape: [usize; 4], last: bool| match last {
                    true => channels_last(&values, shape, &ad),
                    false => Tensor::<4>::from_data(TensorData::new(values, shape), &ad),
                };
                let x = tensor(values(n * c * h * w, 1, 2.0, 0.0), [n, c, h, w], x_last).require_grad();
                let weight = Tensor::<4>::from_data(TensorData::new(values(o * c * k * k, 2, 1.0, 0.0), [o, c, k, k]), &ad).require_grad();
                let bias = Tensor::<1>::from_data(TensorData::new(values(o, 3, 1.0, 0.5), [o]), &ad).require_grad();
                let dy = tensor(values(n * o * ho * wo, 4, 2.0, 0.0), [n, o, ho, wo], dy_last);
                let y = conv2d_dense(x.clone(), weight.clone(), Some(bias.clone()), stride, [pad, pad]);
                let grads = (y.clone() * dy).sum().backward();
                if device == &Device::cpu() {
                    assert!(is_channels_last(y.clone().inner()), "Burn's CubeCL convolutions return channels last");
                }
                let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
                [v(y.inner()), v(x.grad(&grads).unwrap()), v(weight.grad(&grads).unwrap()), bias.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap()]
            };
            let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
            let errors: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_error(g, &w.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())).collect();
            assert!(errors.iter().all(|e| *e < 2e-5), "n {n} c {c} o {o} {h}x{w} kernel {k} stride {stride} padding {pad}, x and dy channels last {x_last}, {dy_last}: relative errors (y, dx, dweight, dbias) {errors:?}");
        }
    }
}
