//! SiLU as one CubeCL kernel each way, for CUDA: `cpu_silu`'s `SiluBackend` for CubeCL, in
//! float32. Burn's composite (`nn::silu`: negate, cap, exp, +1, divide) was 6 launches forward
//! and about as many backward; it runs on the noise embedding's layers (the group norms'
//! SiLU is inside their own kernel).

use crate::cpu_silu::SiluBackend;
use crate::fused_update::cube::{empty, f32_contiguous, grid};
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::CubeBackend;

/// 1 + exp(-x), the exponent capped at 80 as `nn::silu`'s.
#[cube]
fn one_plus_exp_neg(x: f32) -> f32 {
    1.0f32 + f32::exp(f32::min(-x, 80.0f32))
}

#[cube(launch)]
fn silu_kernel(x: &Tensor<f32>, y: &mut Tensor<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        let v = x[i];
        y[i] = v / one_plus_exp_neg(v);
    }
}

/// grad * s * (1 + x (1 - s)), s = sigmoid(x).
#[cube(launch)]
fn silu_backward_kernel(x: &Tensor<f32>, grad: &Tensor<f32>, dx: &mut Tensor<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        let v = x[i];
        let s = 1.0f32 / one_plus_exp_neg(v);
        dx[i] = grad[i] * s * (1.0f32 + v * (1.0f32 - s));
    }
}

impl SiluBackend for CubeBackend {
    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = f32_contiguous(x);
        let y = empty(&x, x.shape());
        let (count, dim) = grid(&x);
        let client = x.client.clone();
        silu_kernel::launch(&client, count, dim, x.into_tensor_arg(), y.clone().into_tensor_arg());
        y
    }

    fn silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let [x, grad] = [x, grad].map(f32_contiguous);
        let dx = empty(&x, x.shape());
        let (count, dim) = grid(&x);
        let client = x.client.clone();
        silu_backward_kernel::launch(&client, count, dim, x.into_tensor_arg(), grad.into_tensor_arg(), dx.clone().into_tensor_arg());
        dx
    }
}

/// The kernels on CubeCL's CPU runtime (`--features cube-cpu`, see `fused_update`'s tests)
/// against the flex operation, which `cpu_silu`'s tests check against the definition.
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use crate::cpu_group_norm::tests::{rel_error, values};
    use crate::nn::silu;
    use burn::tensor::{Device, Tensor, TensorData};

    #[test]
    fn the_cubecl_silu_is_the_flex_one() {
        // Values over [-6, 6] and the capped tails (-100: exp would overflow uncapped), as a
        // contiguous tensor and as a transposed view.
        let mut x = values(37 * 11, 1, 12.0, 0.0);
        x[3] = -100.0;
        x[5] = 100.0;
        for transposed in [false, true] {
            let run = |device: &Device| {
                let ad = device.clone().autodiff();
                let input = Tensor::<2>::from_data(TensorData::new(x.clone(), [37, 11]), &ad).require_grad();
                let viewed = if transposed { input.clone().transpose() } else { input.clone() };
                let y = silu(viewed);
                let [a, b] = y.dims();
                let dy = Tensor::<2>::from_data(TensorData::new(values(a * b, 2, 2.0, 0.0), [a, b]), &ad);
                let grads = (y.clone() * dy).sum().backward();
                let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
                [v(y.inner()), v(input.grad(&grads).unwrap())]
            };
            let (want, got) = (run(&Device::flex()), run(&Device::cpu()));
            let errors: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_error(g, &w.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())).collect();
            assert!(errors.iter().all(|e| *e < 2e-6), "transposed {transposed}: relative errors (y, dx) {errors:?}");
        }
    }
}
