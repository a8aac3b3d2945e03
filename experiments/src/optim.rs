//! Optimiser helpers Burn leaves to the user: clipping by the global gradient norm (PyTorch's
//! `clip_grad_norm_`, as DMD2 uses; Burn's own clipping is per parameter) and linear warm-up;
//! and Adam / AdamW ([`Optim`]) with Burn's update rule and state records, whose update is one
//! kernel per parameter on flex and one per 32 parameters on CUDA (`adam` and `adamw`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{Adam, AdamConfig, AdamState, AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer};
use burn::backend::tensor::FloatTensor;
use burn::backend::Dispatch;
use burn::store::RecordError;
use burn::tensor::{Bytes, Device, FloatDType, Tensor};
use dmd_models::fused_update::{self, AdamStep, UpdateQueue};

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

/// The sum of squares of `module`'s gradients, read back in one host sync (not one per
/// parameter: ~600 on ImageNet's ADM, each a stall on a GPU). On the CPU backends each
/// parameter's sum is taken on the device and the sums are added in float64 on the host, in
/// parameter order. On a GPU, where every tensor op is a kernel launch (~30 us each on the
/// H100 here), one kernel per 32 gradients writes their partial sums into one buffer, read
/// back and added in float64 (`fused_update::sum_of_squares`: N / 32 launches, no copies); where this
/// project's CubeCL kernels are off (Burn's fusion, `DMD_CUBE_KERNELS=off`), the flattened
/// gradients are concatenated and summed once in float32 (N + 2 launches and a copy of all
/// gradients, plus a copy of each that is not contiguous).
fn sum_squares<M: Module>(grads: &GradientsParams, module: &M) -> f64 {
    sum_squares_as(grads, module, None)
}

/// How [`sum_squares`] takes the sums: the CPU's way, or on a GPU with this project's kernel
/// or with Burn's ops.
#[derive(Clone, Copy, PartialEq, Debug)]
enum SquaresOn {
    Cpu,
    GpuKernel,
    GpuCat,
}

/// [`sum_squares`], in the way `on` says (`None`: as the device is).
fn sum_squares_as<M: Module>(grads: &GradientsParams, module: &M, on: Option<SquaresOn>) -> f64 {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        /// Per-parameter sums (CPU) or flattened gradients (GPU, Burn's ops).
        parts: Vec<Tensor<1>>,
        /// The gradients for the kernel, and their device.
        kernel: Vec<FloatTensor<Dispatch>>,
        device: Option<Device>,
        on: Option<SquaresOn>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let g = g.cast(FloatDType::F32);
                let on = *self.on.get_or_insert_with(|| match (launch_bound(&g.device()), fused_update::takes(&g)) {
                    (false, _) => SquaresOn::Cpu,
                    (true, true) => SquaresOn::GpuKernel,
                    (true, false) => SquaresOn::GpuCat,
                });
                match on {
                    SquaresOn::Cpu => self.parts.push(g.square().sum()),
                    SquaresOn::GpuKernel => {
                        self.device.get_or_insert_with(|| g.device());
                        self.kernel.push(g.into_dispatch());
                    }
                    SquaresOn::GpuCat => self.parts.push(g.flatten(0, D - 1)),
                }
            }
        }
    }
    let mut c = Collect { grads, parts: Vec::new(), kernel: Vec::new(), device: None, on };
    module.visit(&mut c);
    let sums = match c.on {
        None => return 0.0,
        Some(SquaresOn::GpuKernel) => return c.device.map_or(0.0, |device| fused_update::sum_of_squares(c.kernel, &device)),
        Some(SquaresOn::GpuCat) => Tensor::cat(c.parts, 0).square().sum(),
        Some(SquaresOn::Cpu) => Tensor::cat(c.parts, 0),
    };
    sums.into_data().iter::<f32>().map(f64::from).sum()
}

/// Whether `device` is a GPU, where each tensor op is a kernel launch (not flex or ndarray).
#[allow(deprecated)] // Device::ndarray: Burn deprecates the backend, this project still offers it
fn launch_bound(device: &Device) -> bool {
    let device = device.clone().inner();
    device != Device::flex() && device != Device::ndarray()
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

/// Moves the module out of `slot`, leaving a stand-in whose parameters hold no tensors (lazy,
/// never initialised: the caller puts a module back before any use).
fn take_for_update<M: Module>(slot: &mut M) -> M {
    struct Vacate;
    impl ModuleMapper for Vacate {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, _) = param.consume();
            let (device, shape, require_grad) = (tensor.device(), tensor.shape(), tensor.is_require_grad());
            Param::uninitialized(id, |_, _| unreachable!("a module taken for its update is put back before use"), device, require_grad, shape)
        }
    }
    let stand_in = slot.clone().map(&mut Vacate);
    std::mem::replace(slot, stand_in)
}

/// Learning rate with linear warm-up over `warmup_steps` (0: none).
pub fn warmup_lr(base: f64, step: usize, warmup_steps: usize) -> f64 {
    if warmup_steps == 0 {
        base
    } else {
        base * ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    }
}

/// A module's optimiser: Burn's `ModuleOptimizer` (its per-parameter states and records, so
/// checkpoints are Burn's), whose fused Adam steps on a GPU are queued parameter by parameter
/// and launched together at the end of the module's step ([`UpdateQueue`]).
pub struct Optim {
    module: ModuleOptimizer,
    queue: Arc<Mutex<UpdateQueue>>,
}

impl Optim {
    /// `module` after one step with its gradients `grads` at learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: GradientsParams) -> M {
        let module = self.module.step(lr, module, grads);
        self.queue.lock().expect("the optimiser's queue").run();
        module
    }

    /// [`step`](Self::step) on the module in `module`, moved out for the step rather than
    /// cloned: the optimiser then holds the only reference to each weight, which the fused
    /// update on a GPU writes over in place. A weight that something else still holds is copied
    /// first (`fused_update`'s `owned`); a clone here left every weight of the generator and the
    /// fake score shared at every step (ImageNet-64: 541 copies per DMD iteration, seen in
    /// `examples/dry_run.rs`).
    pub fn step_in_place<M: Module>(&mut self, lr: f64, module: &mut M, grads: GradientsParams) {
        let taken = take_for_update(module);
        *module = self.step(lr, taken, grads);
    }

    /// Writes the state to `path` (Burn's optimiser record).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), RecordError> {
        self.module.save(path)
    }

    /// This optimiser with the state of a record read whole into `bytes`.
    pub fn from_bytes(self, bytes: Bytes) -> Result<Self, RecordError> {
        Ok(Self { module: self.module.from_bytes(bytes)?, queue: self.queue })
    }
}

/// Adam as Burn's `Adam` (no weight decay, no AMSGrad: EDM's teacher), the same state records
/// (checkpoints load either way), with the update in float32 as one kernel per parameter
/// (`fused_update`) instead of ~15 Burn ops: on flex the same bits, and 2.7 ms of adm_tiny's
/// ~120 ms training step saved; on CUDA (without Burn's fusion) one launch per 32 parameters
/// instead of ~13 per parameter. Elsewhere Burn's own step.
pub fn adam(beta_1: f32, beta_2: f32, epsilon: f32) -> Optim {
    let burn = AdamConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon).build();
    let queue = Arc::new(Mutex::new(UpdateQueue::default()));
    Optim { module: ModuleOptimizer::from(FusedAdam { beta_1, beta_2, epsilon, burn, queue: queue.clone() }), queue }
}

/// AdamW as Burn's `AdamW` (decoupled weight decay, no AMSGrad: DMD's networks), likewise.
pub fn adamw(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Optim {
    let burn = AdamWConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon).with_weight_decay(weight_decay).build();
    let queue = Arc::new(Mutex::new(UpdateQueue::default()));
    Optim { module: ModuleOptimizer::from(FusedAdamW { beta_1, beta_2, epsilon, weight_decay, burn, queue: queue.clone() }), queue }
}

#[derive(Clone)]
struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    burn: Adam,
    queue: Arc<Mutex<UpdateQueue>>,
}

#[derive(Clone)]
struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    burn: AdamW,
    queue: Arc<Mutex<UpdateQueue>>,
}

/// Whether the fused step applies: `fused_update` takes the tensors and the state has no
/// AMSGrad maximum. Otherwise the caller runs Burn's own step.
fn fuses<const D: usize>(tensor: &Tensor<D>, grad: &Tensor<D>, state: Option<&AdaptiveMomentumState<D>>) -> bool {
    fused_update::takes(tensor) && fused_update::takes(grad) && state.is_none_or(|s| s.max_moment_2.is_none())
}

/// The fused step (where [`fuses`]): the moments continue `state` (zeros before the first
/// step: m * beta + g * (1 - beta) is then exactly Burn's first-step g * (1 - beta)),
/// `constants(t)` gives step t's [`AdamStep`]; queued in `queue` on a GPU. The tensor and the
/// moments are taken by value (no clones held while the step is queued).
fn fused_step<const D: usize>(
    tensor: Tensor<D>,
    grad: Tensor<D>,
    state: Option<AdaptiveMomentumState<D>>,
    queue: &Mutex<UpdateQueue>,
    constants: impl FnOnce(usize) -> AdamStep,
) -> (Tensor<D>, AdaptiveMomentumState<D>) {
    let (m1, m2, t) = match state {
        Some(s) => (s.moment_1, s.moment_2, s.time + 1),
        None => (grad.zeros_like(), grad.zeros_like(), 1),
    };
    let (tensor, m1, m2) = queue.lock().expect("the optimiser's queue").adam(tensor, grad, m1, m2, constants(t));
    (tensor, AdaptiveMomentumState::new(t, m1, m2))
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        // Burn's Adam: m1 sqrt(1 - beta_2^t) / (1 - beta_1^t) / (sqrt(m2) + eps sqrt(1 - beta_2^t)).
        let constants = |t: usize| {
            let bias_correction2_sqrt = (1.0 - self.beta_2.powi(t as i32)).sqrt();
            AdamStep {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                m1_scale: bias_correction2_sqrt / (1.0 - self.beta_1.powi(t as i32)),
                m1_divisor: 1.0,
                m2_divisor: 1.0,
                epsilon: self.epsilon * bias_correction2_sqrt,
                decay: 1.0,
                lr: lr as f32,
            }
        };
        if !fuses(&tensor, &grad, state.as_ref().map(|s| &s.momentum)) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (tensor, momentum) = fused_step(tensor, grad, state.map(|s| s.momentum), &self.queue, constants);
        (tensor, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        Adam::to_device(state, device)
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        // Burn's AdamW: param (1 - lr wd) - lr (m1 / (1 - beta_1^t)) / (sqrt(m2 / (1 - beta_2^t)) + eps),
        // the decay skipped when lr wd is 0 (a factor of 1 there: exact).
        let decay_rate = lr * self.weight_decay as f64;
        let constants = |t: usize| AdamStep {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            m1_scale: 1.0,
            m1_divisor: 1.0 - self.beta_1.powi(t as i32),
            m2_divisor: 1.0 - self.beta_2.powi(t as i32),
            epsilon: self.epsilon,
            decay: if decay_rate == 0.0 { 1.0 } else { (1.0 - decay_rate) as f32 },
            lr: lr as f32,
        };
        if !fuses(&tensor, &grad, state.as_ref().map(|s| &s.momentum)) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (tensor, momentum) = fused_step(tensor, grad, state.map(|s| s.momentum), &self.queue, constants);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Several steps of the fused update give Burn's own Adam and AdamW, bit for bit: the
    /// parameters and both moments, from the first step (no state) on, with weight decay and
    /// a learning rate that changes between steps.
    #[test]
    fn fused_steps_are_burns_adam_and_adamw() {
        let device = Device::flex();
        let values = |len: usize, seed: u64| (0..len as u64).map(|i| ((i * 2654435761 + seed * 40503) % 65536) as f32 / 32768.0 - 1.0).collect::<Vec<f32>>();
        let tensor = |seed: u64| Tensor::<2>::from_data(TensorData::new(values(37 * 41, seed), [37, 41]), &device);
        let bits = |t: &Tensor<2>| t.to_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let burn_adam = AdamConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).build();
        let fused_adam = FusedAdam { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, burn: burn_adam.clone(), queue: Default::default() };
        let burn_adamw = AdamWConfig::new().with_beta_1(0.0).with_beta_2(0.99).with_epsilon(1e-8).with_weight_decay(0.01).build();
        let fused_adamw = FusedAdamW { beta_1: 0.0, beta_2: 0.99, epsilon: 1e-8, weight_decay: 0.01, burn: burn_adamw.clone(), queue: Default::default() };
        let (mut want, mut got) = ((tensor(1), None), (tensor(1), None));
        let (mut want_w, mut got_w) = ((tensor(1), None), (tensor(1), None));
        for step in 0..4u64 {
            let grad = tensor(10 + step);
            let lr = 1e-3 * (step + 1) as f64;
            want = burn_adam.step(lr, want.0, grad.clone(), want.1);
            got = fused_adam.step(lr, got.0, grad.clone(), got.1);
            want_w = burn_adamw.step(lr, want_w.0, grad.clone(), want_w.1);
            got_w = fused_adamw.step(lr, got_w.0, grad, got_w.1);
            let (w, g) = (want.1.as_ref().unwrap(), got.1.as_ref().unwrap());
            assert_eq!(bits(&want.0), bits(&got.0), "Adam step {step}: parameters differ");
            assert_eq!((bits(&w.momentum.moment_1), bits(&w.momentum.moment_2), w.momentum.time), (bits(&g.momentum.moment_1), bits(&g.momentum.moment_2), g.momentum.time), "Adam step {step}: state differs");
            let (w, g) = (want_w.1.as_ref().unwrap(), got_w.1.as_ref().unwrap());
            assert_eq!(bits(&want_w.0), bits(&got_w.0), "AdamW step {step}: parameters differ");
            assert_eq!((bits(&w.momentum.moment_1), bits(&w.momentum.moment_2), w.momentum.time), (bits(&g.momentum.moment_1), bits(&g.momentum.moment_2), g.momentum.time), "AdamW step {step}: state differs");
        }
    }

    /// `step_in_place` gives `step`'s module, bit for bit, and hands the optimiser the only
    /// reference to each weight: the module taken out of its slot shares no buffer (flex's
    /// reference count), where a clone shares every one, and the stand-in left in the slot
    /// holds no tensor.
    #[test]
    fn steps_in_place_hand_the_optimiser_the_only_reference_to_each_weight() {
        use burn::backend::{BackendTensor, DispatchTensorKind};
        use burn::nn::{Linear, LinearConfig};
        #[derive(Module, Debug)]
        struct Two {
            a: Linear,
            b: Linear,
        }
        /// Whether each weight of `m` is held by `m` alone (`m` consumed).
        fn sole_holders(m: Two) -> Vec<bool> {
            struct Check(Vec<bool>);
            impl ModuleMapper for Check {
                fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                    let (id, tensor, mapper) = param.consume();
                    let tensor = tensor.inner().into_dispatch();
                    self.0.push(match &tensor.kind {
                        DispatchTensorKind::Flex(BackendTensor::Float(t)) => t.is_unique(),
                        _ => panic!("a flex float tensor"),
                    });
                    Param::from_mapped_value(id, Tensor::from_dispatch(tensor).autodiff(), mapper)
                }
            }
            let mut check = Check(Vec::new());
            let _ = m.map(&mut check);
            check.0
        }
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::from_data(TensorData::new((0..35).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [5, 7]), &device);
        let init = || Two { a: LinearConfig::new(7, 13).init(&device), b: LinearConfig::new(13, 3).init(&device) };
        let mut slot = init();
        let taken = take_for_update(&mut slot);
        assert_eq!(sole_holders(taken), vec![true; 4], "the taken module shares a weight");
        let mut stand_in_tensors = 0;
        slot.visit(&mut CountInitialised(&mut stand_in_tensors));
        assert_eq!(stand_in_tensors, 0, "the stand-in holds tensors");
        let original = init();
        let copy = original.clone();
        assert_eq!(sole_holders(copy), vec![false; 4], "a clone's weights are shared (the check can fail)");
        // Two steps each way, from the same start.
        let mut by_move = init();
        let mut by_value = Some(by_move.clone());
        let (mut optim_a, mut optim_b) = (adamw(0.9, 0.99, 1e-8, 0.01), adamw(0.9, 0.99, 1e-8, 0.01));
        for step in 0..2 {
            let lr = 1e-2 * (step + 1) as f64;
            let loss = |m: &Two| m.b.forward(m.a.forward(x.clone()).tanh()).powf_scalar(2.0).sum();
            let grads = GradientsParams::from_grads(loss(&by_move).backward(), &by_move);
            optim_a.step_in_place(lr, &mut by_move, grads);
            let m = by_value.take().expect("module");
            let grads = GradientsParams::from_grads(loss(&m).backward(), &m);
            by_value = Some(optim_b.step(lr, m, grads));
        }
        let bits = |m: &Two| dmd_models::weights::flat_params(m).into_iter().map(|(k, t)| (k, t.into_data().iter::<f32>().map(f32::to_bits).collect::<Vec<_>>())).collect::<Vec<_>>();
        assert_eq!(bits(&by_move), bits(by_value.as_ref().expect("module")), "step_in_place differs from step");
    }

    /// Counts the initialised float parameters of a module.
    struct CountInitialised<'a>(&'a mut usize);
    impl ModuleVisitor for CountInitialised<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            *self.0 += usize::from(param.is_initialized());
        }
    }

    /// The three ways of summing the squared gradients (per parameter on the CPU; on a GPU,
    /// partial sums per gradient from one kernel each, here flex's, or concatenated) give the
    /// float64 sum of squares of all gradients to float32 rounding.
    #[test]
    fn the_three_gradient_sums_are_the_sum_of_squares() {
        use burn::module::Module;
        use burn::nn::{Linear, LinearConfig};
        #[derive(Module, Debug)]
        struct Two {
            a: Linear,
            b: Linear,
        }
        let device = Device::flex().autodiff();
        let net = Two { a: LinearConfig::new(7, 13).init(&device), b: LinearConfig::new(13, 3).init(&device) };
        let x = Tensor::<2>::from_data(TensorData::new((0..35).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [5, 7]), &device);
        let loss = net.b.forward(net.a.forward(x).tanh()).powf_scalar(2.0).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let mut want = 0.0f64;
        let mut add = |t: Option<Tensor<2>>| want += t.unwrap().into_data().iter::<f32>().map(|v| f64::from(v) * f64::from(v)).sum::<f64>();
        add(grads.get::<2>(net.a.weight.id));
        add(grads.get::<2>(net.b.weight.id));
        for bias in [&net.a.bias, &net.b.bias] {
            want += grads.get::<1>(bias.as_ref().unwrap().id).unwrap().into_data().iter::<f32>().map(|v| f64::from(v) * f64::from(v)).sum::<f64>();
        }
        assert!(want > 0.0);
        for on in [SquaresOn::Cpu, SquaresOn::GpuKernel, SquaresOn::GpuCat] {
            let got = sum_squares_as(&grads, &net, Some(on));
            assert!((got - want).abs() <= 1e-6 * want, "{on:?}: {got} against {want}");
        }
    }
}

/// The optimisers on CubeCL's CPU runtime, where each module's steps are queued and launched
/// 32 tensors at a time at the end of its step (`cargo test -p dmd-experiments --features
/// cube-cpu optim`; not part of CI, as `dmd-models`' kernel tests): against Burn's own Adam and
/// AdamW on the same device, step after step, to float32 rounding (the kernel's multiply-adds
/// may be contracted; a lost, misplaced or stale update is ~lr = 1e-3 off).
#[cfg(all(test, feature = "cube-cpu"))]
mod cube_tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;
    use dmd_models::weights::flat_params;

    /// 20 layers: 40 parameter tensors, more than one launch takes.
    #[derive(Module, Debug)]
    struct Deep {
        layers: Vec<Linear>,
    }

    impl Deep {
        fn loss(&self, x: Tensor<2>) -> Tensor<1> {
            self.layers.iter().fold(x, |h, layer| layer.forward(h).tanh()).powf_scalar(2.0).sum()
        }
    }

    #[test]
    fn queued_optimisers_are_burns_adam_and_adamw() {
        let device = Device::cpu().autodiff();
        let net = Deep { layers: (0..20).map(|k| LinearConfig::new(6 + k % 3, 6 + (k + 1) % 3).init(&device)).collect() };
        let x = Tensor::<2>::from_data(TensorData::new((0..24).map(|i| (i as f32 * 0.61).sin()).collect::<Vec<_>>(), [4, 6]), &device);
        let burn_adam = || ModuleOptimizer::from(AdamConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-5).build());
        let burn_adamw = || ModuleOptimizer::from(AdamWConfig::new().with_beta_1(0.0).with_beta_2(0.99).with_epsilon(1e-8).with_weight_decay(0.01).build());
        for (name, mut ours, mut theirs) in [("Adam", adam(0.9, 0.999, 1e-5), burn_adam()), ("AdamW", adamw(0.0, 0.99, 1e-8, 0.01), burn_adamw())] {
            let (mut got, mut want) = (net.clone(), net.clone());
            for step in 0..3 {
                let lr = 1e-3 * (step + 1) as f64;
                let grads = GradientsParams::from_grads(got.loss(x.clone()).backward(), &got);
                got = ours.step(lr, got, grads);
                let grads = GradientsParams::from_grads(want.loss(x.clone()).backward(), &want);
                want = theirs.step(lr, want, grads);
                let (got_params, want_params) = (flat_params(&got), flat_params(&want));
                assert_eq!(got_params.len(), 40);
                for (key, w) in &want_params {
                    let (g, w) = (got_params[key].to_data().try_to_vec::<f32>().unwrap(), w.to_data().try_to_vec::<f32>().unwrap());
                    let worst = g.iter().zip(&w).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
                    assert!(worst <= 1e-6, "{name} step {step}, {key}: {worst:e} off Burn's");
                }
            }
        }
    }
}
