//! Optimiser helpers Burn leaves to the user: clipping by the global gradient norm (PyTorch's
//! `clip_grad_norm_`, as DMD2 uses; Burn's own clipping is per parameter) and linear warm-up.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, Tensor};

/// Scales every gradient of `module` so that their global L2 norm is at most `max_norm`
/// (no-op when `max_norm` is not positive). Returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(grads: &mut GradientsParams, module: &M, max_norm: f64) -> f64 {
    let norm = grad_norm(grads, module);
    if max_norm > 0.0 && norm > max_norm {
        scale(grads, module, max_norm / (norm + 1e-6));
    }
    norm
}

/// [`clip_grad_norm`] over two modules together (one norm over both, as PyTorch's
/// `clip_grad_norm_` over a model holding both).
pub fn clip_grad_norm_joint<A: Module, B: Module>(ga: &mut GradientsParams, a: &A, gb: &mut GradientsParams, b: &B, max_norm: f64) -> f64 {
    let norm = (sum_squares(ga, a) + sum_squares(gb, b)).sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        scale(ga, a, factor);
        scale(gb, b, factor);
    }
    norm
}

/// The global L2 norm of `module`'s gradients (also the NaN/Inf guard of training steps
/// without clipping).
pub fn grad_norm<M: Module>(grads: &GradientsParams, module: &M) -> f64 {
    sum_squares(grads, module).sqrt()
}

/// The sum of squares of `module`'s gradients. Each parameter's sum is taken on the device;
/// the sums come back in one read (one host sync, not one per parameter: ~600 on ImageNet's
/// ADM, each a stall on a GPU) and are added in float64 on the host, in parameter order.
fn sum_squares<M: Module>(grads: &GradientsParams, module: &M) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        sums: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sums.push(g.square().sum().cast(FloatDType::F32));
            }
        }
    }
    let mut s = SumSquares { grads, sums: Vec::new() };
    module.visit(&mut s);
    if s.sums.is_empty() {
        return 0.0;
    }
    let sums = Tensor::cat(s.sums, 0).into_data();
    sums.iter::<f32>().map(f64::from).sum()
}

fn scale<M: Module>(grads: &mut GradientsParams, module: &M, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}

/// Learning rate with linear warm-up over `warmup_steps` (0: none).
pub fn warmup_lr(base: f64, step: usize, warmup_steps: usize) -> f64 {
    if warmup_steps == 0 {
        base
    } else {
        base * ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    }
}
