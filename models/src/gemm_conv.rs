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

/// The output shape of `gemm_conv2d` (for Burn's fusion, which records it before running).
#[cfg_attr(not(feature = "fusion"), allow(dead_code))]
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
    use burn_cubecl::kernel::conv::{conv_data_backward, conv_forward, conv_weight_backward, ConvStrategy};
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::Shape;
    use burn_cubecl::tensor::CubeTensor;
    #[cfg(cube_kernels)]
    use {crate::fused_update::cube::channels_last, burn_cubecl::ops::permute_nchw_to_nhwc};
    use burn_cubecl::CubeBackend;
    use std::fmt::Debug;
    use std::sync::Mutex;

    /// `run` with the implicit-GEMM kernel; where its setup declines the shapes or dtype (an
    /// error), with Burn's direct kernel instead, noting that on stderr once per operation and
    /// convolution, and going to the direct kernel at once from then on (a declined attempt can
    /// cost copies of its inputs before it fails).
    fn implicit_gemm_or_direct<T, E: Debug>(op: &str, x: &CubeTensor, weight: &Shape, o: &ConvOptions<2>, run: impl Fn(ConvStrategy) -> Result<T, E>) -> T {
        static DECLINED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let what = format!("input {:?} ({:?}, strides {:?}), weight {:?}, stride {:?}, padding {:?}", x.shape(), x.dtype, x.meta.strides(), weight, o.stride, o.padding);
        let key = format!("{op} {what}");
        let direct = |run: &dyn Fn(ConvStrategy) -> Result<T, E>| run(ConvStrategy::Direct).unwrap_or_else(|e| panic!("direct {op} of {what}: {e:?}"));
        if DECLINED.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            return direct(&run);
        }
        run(ConvStrategy::ImplicitGemm).unwrap_or_else(|err| {
            eprintln!("note: implicit-GEMM {op} declined {what} ({err:?}); using Burn's direct kernel for it");
            DECLINED.lock().unwrap_or_else(|e| e.into_inner()).push(key.clone());
            direct(&run)
        })
    }

    /// The convolution with its bias in the implicit-GEMM kernel's epilogue (no separate
    /// full-size add), and the bias gradient as one reduction over the output gradient's
    /// channels-last rows [N H W, O] (which the weight gradient then reads without a copy),
    /// instead of Burn's broadcast add and its sums over batch and pixels.
    #[cfg(cube_kernels)]
    impl crate::cpu_conv::ConvBiasBackend for CubeBackend {
        fn conv2d_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            implicit_gemm_or_direct("convolution with bias", &x, &weight.shape(), &o, |s| conv_forward::<2>(x.clone(), weight.clone(), Some(bias.clone()), o.clone(), s))
        }

        fn conv2d_bias_param_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
            use burn::backend::ops::FloatTensorOps;
            let o = options(stride, pad_h, pad_w);
            let grad = channels_last(grad);
            let dw = implicit_gemm_or_direct("weight gradient", &x, &weight.shape(), &o, |s| conv_weight_backward::<2>(x.clone(), grad.clone(), weight.shape(), o.clone(), s));
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
            implicit_gemm_or_direct("convolution", &x, &weight.shape(), &o, |s| conv_forward::<2>(x.clone(), weight.clone(), None, o.clone(), s))
        }

        fn gemm_conv2d_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            implicit_gemm_or_direct("input gradient", &x, &weight.shape(), &o, |s| conv_data_backward::<2>(grad.clone(), weight.clone(), x.shape(), o.clone(), s))
        }

        fn gemm_conv2d_weight_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
            let o = options(stride, pad_h, pad_w);
            implicit_gemm_or_direct("weight gradient", &x, &weight.shape(), &o, |s| conv_weight_backward::<2>(x.clone(), grad.clone(), weight.shape(), o.clone(), s))
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
