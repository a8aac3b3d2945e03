//! EDM's building blocks (`training/networks.py`): Linear, Conv2d with FIR up/down-sampling,
//! GroupNorm, the two noise embeddings, and the one `UNetBlock` that serves ADM, DDPM++ and
//! NCSN++. Parameters keep EDM's layouts and names (`weight` [out, in], `resample_filter`,
//! `freqs`) so a PyTorch `state_dict` maps onto them one to one.

use burn::module::{
    Content, Devices, Flag, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param,
};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::softmax;
use burn::tensor::module::{avg_pool2d, conv2d, conv_transpose2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, ConvTransposeOptions};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Where fresh parameters come from: the device, and a host RNG so that a seeded
/// initialisation is identical on every backend.
pub struct Init {
    pub device: Device,
    rng: StdRng,
    /// False when the values will be overwritten by a checkpoint: skip drawing them.
    random: bool,
}

impl Init {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self { device: device.clone(), rng: StdRng::seed_from_u64(seed), random: true }
    }

    /// Zero-filled parameters, for a network whose weights come from a file.
    pub fn placeholder(device: &Device) -> Self {
        Self { device: device.clone(), rng: StdRng::seed_from_u64(0), random: false }
    }

    pub(crate) fn param<const D: usize>(&mut self, shape: [usize; D], values: impl Fn(&mut StdRng) -> f32) -> Param<Tensor<D>> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if self.random { (0..n).map(|_| values(&mut self.rng)).collect() } else { vec![0.0; n] };
        Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), &self.device))
    }

    /// A parameter EDM registers as a buffer (never trained): a resample filter, Fourier
    /// frequencies.
    fn buffer<const D: usize>(&mut self, data: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), &self.device))
            .set_require_grad(false)
    }
}

/// EDM's `weight_init` modes, with the `init_weight` / `init_bias` multipliers.
#[derive(Clone, Copy, Debug)]
pub enum InitMode {
    XavierUniform,
    XavierNormal,
    KaimingUniform,
    KaimingNormal,
}

#[derive(Clone, Copy, Debug)]
pub struct InitSpec {
    pub mode: InitMode,
    pub weight: f64,
    pub bias: f64,
}

impl InitSpec {
    pub const fn new(mode: InitMode, weight: f64, bias: f64) -> Self {
        Self { mode, weight, bias }
    }

    pub(crate) fn sampler(&self, fan_in: usize, fan_out: usize, scale: f64) -> impl Fn(&mut StdRng) -> f32 {
        let (fi, fo) = (fan_in as f64, fan_out as f64);
        let (uniform, std) = match self.mode {
            InitMode::XavierUniform => (true, (6.0 / (fi + fo)).sqrt()),
            InitMode::XavierNormal => (false, (2.0 / (fi + fo)).sqrt()),
            InitMode::KaimingUniform => (true, (3.0 / fi).sqrt()),
            InitMode::KaimingNormal => (false, (1.0 / fi).sqrt()),
        };
        move |rng: &mut StdRng| {
            let r: f64 = if uniform { rng.random::<f64>() * 2.0 - 1.0 } else { rng.sample(StandardNormal) };
            (std * r * scale) as f32
        }
    }
}

/// Fully connected layer; `weight` is [out, in] as in PyTorch.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn new(init: &mut Init, in_features: usize, out_features: usize, bias: bool, spec: InitSpec) -> Self {
        let weight = init.param([out_features, in_features], spec.sampler(in_features, out_features, spec.weight));
        let bias = bias.then(|| init.param([out_features], spec.sampler(in_features, out_features, spec.bias)));
        Self { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// The layer applied to every token of `x` [B, L, C].
    pub fn forward_tokens(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, l, c] = x.dims();
        let y = self.forward(x.reshape([b * l, c]));
        let out = y.dims()[1];
        y.reshape([b, l, out])
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let dtype = x.dtype();
        let x = x.matmul(like(self.weight.val(), dtype).transpose());
        match &self.bias {
            Some(b) => x + like(b.val(), dtype).unsqueeze::<2>(),
            None => x,
        }
    }
}

/// The FIR filter of EDM's resampling convolutions: outer(f, f) / sum(f)^2, as [1, 1, k, k].
pub fn resample_filter_values(f: &[f64]) -> (Vec<f32>, usize) {
    let s: f64 = f.iter().sum();
    let k = f.len();
    let mut out = Vec::with_capacity(k * k);
    for a in f {
        for b in f {
            out.push((a * b / (s * s)) as f32);
        }
    }
    (out, k)
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Resample {
    #[default]
    None,
    Up,
    Down,
}

/// Convolution with optional 2x up/down-sampling by a FIR filter. `kernel = 0` gives a pure
/// resampling layer without weights (EDM's `aux_down`, `aux_up`, and the weightless skip).
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Option<Param<Tensor<4>>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub resample_filter: Option<Param<Tensor<4>>>,
    #[module(skip)]
    pub resample: Resample,
    pub fused_resample: bool,
    pub in_channels: usize,
    pub out_channels: usize,
}

pub struct ConvSpec<'a> {
    pub kernel: usize,
    pub bias: bool,
    pub resample: Resample,
    pub resample_filter: &'a [f64],
    pub fused_resample: bool,
    pub init: InitSpec,
}

impl Conv2d {
    pub fn new(init: &mut Init, in_channels: usize, out_channels: usize, spec: ConvSpec) -> Self {
        let k = spec.kernel;
        let (fan_in, fan_out) = (in_channels * k * k, out_channels * k * k);
        let weight = (k > 0).then(|| init.param([out_channels, in_channels, k, k], spec.init.sampler(fan_in, fan_out, spec.init.weight)));
        let bias = (k > 0 && spec.bias).then(|| init.param([out_channels], spec.init.sampler(fan_in, fan_out, spec.init.bias)));
        let resample_filter = (spec.resample != Resample::None).then(|| {
            let (values, fk) = resample_filter_values(spec.resample_filter);
            init.buffer(values, [1, 1, fk, fk])
        });
        Self {
            weight,
            bias,
            resample_filter,
            resample: spec.resample,
            fused_resample: spec.fused_resample,
            in_channels,
            out_channels,
        }
    }

    /// Depthwise filter for `channels` channels: [channels, 1, k, k].
    fn filter(&self, channels: usize, scale: f64, dtype: DType) -> Tensor<4> {
        let f = like(self.resample_filter.as_ref().expect("resampling conv has a filter").val(), dtype);
        let f = if scale != 1.0 { f.mul_scalar(scale) } else { f };
        f.repeat_dim(0, channels)
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let w = self.weight.as_ref().map(|w| like(w.val(), dtype));
        let w_pad = w.as_ref().map_or(0, |w| w.dims()[3] / 2);
        let f_pad = self.resample_filter.as_ref().map_or(0, |f| (f.shape()[3] - 1) / 2);
        // The bias goes into the convolution where nothing follows it (on flex the same
        // operation then adds it, `cpu_conv::ConvBiasBackend`), after the down-sampling otherwise.
        let bias = self.bias.as_ref().map(|b| like(b.val(), dtype));
        let plain = |x: Tensor<4>, w: Tensor<4>, pad: usize, bias: Option<Tensor<1>>| conv2d_dense(x, w, bias, 1, [pad, pad]);
        let up = |x: Tensor<4>, c: usize, pad: usize| {
            conv_transpose2d(x, self.filter(c, 4.0, dtype), None, ConvTransposeOptions::new([2, 2], [pad, pad], [0, 0], [1, 1], c))
        };
        let down = |x: Tensor<4>, c: usize, pad: usize| conv2d(x, self.filter(c, 1.0, dtype), None, ConvOptions::new([2, 2], [pad, pad], [1, 1], c));

        // EDM's default filter [1, 1] is a 2x2 box: down-sampling is a 2x2 average and
        // up-sampling (filter * 4 = ones) repeats each pixel, both exact in float. Those ops
        // are much faster than the depthwise (transposed) convolution on the CPU backends.
        let boxed = f_pad == 0 && self.resample_filter.as_ref().is_some_and(|f| f.shape()[3] == 2);
        let up = |x: Tensor<4>, c: usize, pad: usize| if boxed && pad == 0 { upsample_nearest2x(x) } else { up(x, c, pad) };
        let down = |x: Tensor<4>, c: usize, pad: usize| {
            if boxed && pad == 0 { avg_pool_2x2(x) } else { down(x, c, pad) }
        };
        match (self.resample, w) {
            (Resample::Up, Some(w)) if self.fused_resample => {
                let x = up(x, self.in_channels, f_pad.saturating_sub(w_pad));
                plain(x, w, w_pad.saturating_sub(f_pad), bias)
            }
            (Resample::Down, Some(w)) if self.fused_resample => {
                let x = plain(x, w, w_pad + f_pad, None);
                add_channel_bias(down(x, self.out_channels, 0), bias)
            }
            (resample, w) => {
                let x = match resample {
                    Resample::Up => up(x, self.in_channels, f_pad),
                    Resample::Down => down(x, self.in_channels, f_pad),
                    Resample::None => x,
                };
                match w {
                    Some(w) => plain(x, w, w_pad, bias),
                    None => add_channel_bias(x, bias),
                }
            }
        }
    }
}

/// How the ungrouped convolutions of the networks (EDM's 1x1 and 3x3, Stable Diffusion's,
/// LPIPS's VGG, the GAN head's, the FID Inception's) are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvImpl {
    /// Burn's `conv2d` (and its backward kernels); unpadded 1x1 convolutions still run as
    /// the matrix product they are (`conv2d_dense`).
    Native,
    /// `conv2d_im2col`: shifted copies of the input and one matrix product. On CUDA Burn
    /// 0.22 without its `autotune` feature runs `conv2d` as a direct kernel (and its weight
    /// gradient as a convolution over the batch), far slower than its matrix product.
    Im2col,
    /// `gemm_conv::gemm_conv2d`, the default: on CUDA Burn's implicit-GEMM kernels for the
    /// forward pass and both gradients (no im2col copy; at stride > 1 Burn computes the input
    /// gradient with its direct transposed convolution); on flex `cpu_conv`'s blocked im2col
    /// products in float32 (~2x Burn's `conv2d` forward + backward); on ndarray the same
    /// kernels as `Native`.
    Gemm,
}

static CONV_IMPL: AtomicU8 = AtomicU8::new(ConvImpl::Gemm as u8);

/// Chooses the convolution for the whole process (`dmd` sets it from the device, or from
/// the `DMD_CONV` environment variable).
pub fn set_conv_impl(imp: ConvImpl) {
    CONV_IMPL.store(imp as u8, Ordering::Relaxed);
}

pub fn conv_impl() -> ConvImpl {
    match CONV_IMPL.load(Ordering::Relaxed) {
        v if v == ConvImpl::Im2col as u8 => ConvImpl::Im2col,
        v if v == ConvImpl::Gemm as u8 => ConvImpl::Gemm,
        _ => ConvImpl::Native,
    }
}

/// An ungrouped convolution with zero padding `[top and bottom, left and right]`, the one
/// every network calls, computed as `conv_impl()` says. Under `gemm` on flex in float32 every
/// case runs `cpu_conv`, with the bias inside the operation (`cpu_conv::ConvBiasBackend`).
/// Otherwise an unpadded 1x1 convolution (attention's qkv and projection, skip connections)
/// is always the matrix product it is: ~3x faster forward + backward than Burn's `conv2d`,
/// whose weight gradient runs as a convolution with an image-sized kernel. Im2col is stride 1
/// only: other strides (a few down-sampling layers) then use Burn's `conv2d`. Under `gemm` on
/// CUDA the bias is inside the convolution too (unless `DMD_CUBE_KERNELS=off`).
pub fn conv2d_dense(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, stride: usize, padding: [usize; 2]) -> Tensor<4> {
    if conv_impl() == ConvImpl::Gemm && on_flex_f32(&x) {
        return match bias {
            Some(bias) => crate::cpu_conv::conv2d_bias(x, weight, bias, stride, padding),
            None => crate::gemm_conv::gemm_conv2d(x, weight, stride, padding),
        };
    }
    let [_, _, kh, kw] = weight.dims();
    let pointwise = kh == 1 && kw == 1 && padding == [0, 0];
    if stride == 1 && (pointwise || conv_impl() == ConvImpl::Im2col) {
        conv2d_im2col(x, weight, bias, padding)
    } else if conv_impl() == ConvImpl::Gemm {
        match bias {
            // The bias inside the convolution on CUDA (`gemm_conv`'s `ConvBiasBackend`).
            Some(bias) if cube_kernels(&x.device()) => crate::cpu_conv::conv2d_bias(x, weight, bias, stride, padding),
            bias => add_channel_bias(crate::gemm_conv::gemm_conv2d(x, weight, stride, padding), bias),
        }
    } else {
        conv2d(x, weight, bias, ConvOptions::new([stride, stride], padding, [1, 1], 1))
    }
}

/// The same convolution as one matrix product: the kh x kw shifted views of the padded
/// input stacked as [N, C*kh*kw, Ho*Wo] (channel-major, like the weight's [O, C, kh, kw]),
/// multiplied by the weight as [O, C*kh*kw]. A 1x1 convolution is the product alone.
/// Autodiff differentiates it through slices and the product.
pub fn conv2d_im2col(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, padding: [usize; 2]) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let [o, c_w, kh, kw] = weight.dims();
    let [ph, pw] = padding;
    assert_eq!(c, c_w, "conv2d_im2col: input has {c} channels, weight expects {c_w}");
    assert!(kh <= h + 2 * ph && kw <= w + 2 * pw, "conv2d_im2col: kernel {kh}x{kw} larger than the padded input {}x{}", h + 2 * ph, w + 2 * pw);
    let (ho, wo) = (h + 2 * ph + 1 - kh, w + 2 * pw + 1 - kw);
    let cols = if kh == 1 && kw == 1 && padding == [0, 0] {
        x.reshape([n, c, h * w])
    } else {
        let x = if padding != [0, 0] { x.pad((pw, pw, ph, ph), 0.0) } else { x };
        let taps: Vec<Tensor<4>> = (0..kh)
            .flat_map(|i| (0..kw).map(move |j| (i, j)))
            .map(|(i, j)| x.clone().slice([0..n, 0..c, i..i + ho, j..j + wo]))
            .collect();
        Tensor::stack::<5>(taps, 2).reshape([n, c * kh * kw, ho * wo])
    };
    add_channel_bias(weight.reshape([1, o, c * kh * kw]).matmul(cols).reshape([n, o, ho, wo]), bias)
}

/// `y` [N, O, H, W] plus a per-channel `bias` [O], if any.
fn add_channel_bias(y: Tensor<4>, bias: Option<Tensor<1>>) -> Tensor<4> {
    match bias {
        Some(b) => y + b.reshape([1, -1, 1, 1]),
        None => y,
    }
}

/// `w` in the dtype of the activations it meets: EDM's mixed precision keeps float32 master
/// weights and casts them at use (a no-op in float32).
pub fn like<const D: usize>(w: Tensor<D>, dtype: DType) -> Tensor<D> {
    w.cast(dtype)
}

/// SiLU, x * sigmoid(x), written as x / (1 + exp(-x)): the same function, about 2.5x faster
/// than Burn's composite `silu` on the flex backend. The exponent is capped at 80 so that
/// exp never overflows (whose gradient would be NaN); below x = -80 SiLU is 0 to float32
/// precision either way. On flex it is `cpu_silu`'s single operation (one pass each way), on
/// CUDA `cube_silu`'s (one kernel each way).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if on_flex_f32(&x) {
        return crate::cpu_silu::silu(x);
    }
    if cube_kernels(&x.device()) {
        // One kernel each way on CUDA too (`cube_silu`), in float32.
        return in_float32(x, crate::cpu_silu::silu);
    }
    x.clone() / x.neg().clamp_max(80.0).exp().add_scalar(1.0)
}

/// Whether `x` goes to this crate's flex kernels (`cpu_*`): float32 on the flex device.
fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && x.device().inner() == Device::flex()
}

static CUBE_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turns this crate's CubeCL kernels on or off for the whole process (`dmd` sets it from the
/// `DMD_CUBE_KERNELS` environment variable); off, CubeCL devices run Burn's ops instead.
pub fn set_cube_kernels(on: bool) {
    CUBE_KERNELS.store(on, Ordering::Relaxed);
}

/// Whether this crate's CubeCL kernels (`cube_group_norm`, `fused_update`) run on `device` (or
/// on the device it wraps for autodiff): a CubeCL device (CUDA) in a build without Burn's
/// fusion, which records operations for its own kernels instead (`cfg(cube_kernels)`, set by
/// models/build.rs) and unless [`set_cube_kernels`] turned them off.
pub fn cube_kernels(device: &Device) -> bool {
    #[cfg(cube_kernels)]
    return CUBE_KERNELS.load(Ordering::Relaxed) && matches!(device.clone().inner().as_dispatch(), burn::backend::DispatchDevice::Cube(_));
    #[cfg(not(cube_kernels))]
    {
        let _ = device;
        false
    }
}

/// `a` [N, Ca, H, W] and `b` [N, Cb, H, W] concatenated along the channels (a UNet decoder's
/// skip connection): one parallel copy each way on flex (`cpu_cat`), Burn's `cat` elsewhere.
pub fn cat_channels(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    if on_flex_f32(&a) && on_flex_f32(&b) {
        return crate::cpu_cat::cat_channels(a, b);
    }
    Tensor::cat(vec![a, b], 1)
}

/// 2x2 average pooling, [N, C, H, W] -> [N, C, H/2, W/2] (one parallel pass each way on flex).
pub fn avg_pool_2x2(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if on_flex_f32(&x) && h % 2 == 0 && w % 2 == 0 {
        return crate::cpu_resample::avg_pool_2x2(x);
    }
    avg_pool2d(x, AvgPoolOptions::new([2, 2]))
}

/// Repeats every pixel 2x2: [N, C, H, W] -> [N, C, 2H, 2W] (exact, and differentiable; one
/// parallel pass each way on flex).
pub fn upsample_nearest2x(x: Tensor<4>) -> Tensor<4> {
    if on_flex_f32(&x) {
        return crate::cpu_resample::repeat_2x2(x);
    }
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1]).expand([n, c, h, 2, w, 2]).reshape([n, c, 2 * h, 2 * w])
}

/// Group normalisation with EDM's group count: min(num_groups, channels / 4).
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(init: &mut Init, num_channels: usize, eps: f64) -> Self {
        let num_groups = 32.min(num_channels / 4).max(1);
        Self {
            weight: init.param([num_channels], |_| 1.0),
            bias: init.param([num_channels], |_| 0.0),
            num_groups,
            eps,
        }
    }

    /// A group norm with an explicit group count (Stable Diffusion's 32 groups).
    pub fn with_groups(init: &mut Init, num_channels: usize, num_groups: usize, eps: f64) -> Self {
        let mut n = Self::new(init, num_channels, eps);
        n.num_groups = num_groups;
        n
    }

    /// Normalises in float32 whatever the activations' dtype (as autocast runs group_norm),
    /// and returns the input's dtype. The affine weight is folded into the per-group scale
    /// 1/sqrt(var + eps) first: one full-size pass fewer than normalising, then scaling
    /// (about 15-25% faster on flex).
    ///
    /// Each group's values are viewed as [rows, k] (k up to 256) and its sums taken in two
    /// short reductions rather than one long one: without Burn's autotune, CubeCL's reduce
    /// kernel gives one thread to each output, so a sum over a whole group (24576 values in
    /// the ImageNet-64 ADM) ran on a few hundred threads. The gradients autodiff sums for the
    /// broadcast statistics take the same two-step shape.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if on_flex_f32(&x) || cube_kernels(&x.device()) {
            return self.one_operation(x, None, false);
        }
        let [n, c, h, w] = x.dims();
        let dtype = x.dtype();
        let g = self.num_groups;
        let len = (c / g) * h * w;
        let k = gcd(len, 256);
        let group_mean = |t: Tensor<4>| t.sum_dim(3).sum_dim(2).div_scalar(len as f64); // [n, g, 1, 1]
        let xg = x.cast(FloatDType::F32).reshape([n, g, len / k, k]);
        let mean = group_mean(xg.clone());
        let centered = xg - mean;
        let inv_std = group_mean(centered.clone().square()).add_scalar(self.eps).sqrt().recip();
        let scale = inv_std.reshape([n, g, 1]).expand([n, g, c / g]).reshape([n, c, 1, 1]) * self.weight.val().reshape([1, -1, 1, 1]);
        (centered.reshape([n, c, h, w]) * scale + self.bias.val().reshape([1, -1, 1, 1])).cast(dtype)
    }

    /// SiLU of the norm, or, given EDM's adaptive `modulation` [N, 2C] (a per-sample scale and
    /// shift from the noise embedding, in that order), silu(shift + norm(x) * (scale + 1)). On
    /// flex in float32 and on CUDA that is one operation each way (`one_operation`).
    pub fn forward_silu(&self, x: Tensor<4>, modulation: Option<Tensor<2>>) -> Tensor<4> {
        if on_flex_f32(&x) || cube_kernels(&x.device()) {
            return self.one_operation(x, modulation, true);
        }
        let y = self.forward(x);
        match modulation {
            Some(modulation) => {
                let [scale, shift]: [Tensor<2>; 2] = modulation.chunk(2, 1).try_into().expect("two chunks");
                silu(shift.unsqueeze_dims::<4>(&[2, 3]) + y * scale.unsqueeze_dims::<4>(&[2, 3]).add_scalar(1.0))
            }
            None => silu(y),
        }
    }

    /// The norm (and SiLU), its affine and the modulation as one operation each way
    /// (`cpu_group_norm`): on flex one parallel pass, ~3x the composite; on CUDA one CubeCL
    /// kernel forward and two backward (`cube_group_norm`) instead of a dozen or more launches.
    /// In float32 whatever the activations' dtype (on flex they are float32 already: the casts
    /// do nothing), which it returns.
    fn one_operation(&self, x: Tensor<4>, modulation: Option<Tensor<2>>, silu: bool) -> Tensor<4> {
        let modulation = modulation.map(|m| m.cast(FloatDType::F32));
        let [weight, bias] = [self.weight.val(), self.bias.val()].map(|w| w.cast(FloatDType::F32));
        in_float32(x, |x| crate::cpu_group_norm::group_norm(x, weight, bias, modulation, self.num_groups, self.eps, silu))
    }
}

/// `op` on `x` in float32 (this crate's single operations take float32), its result returned
/// in `x`'s dtype; in float32 both casts do nothing.
fn in_float32<const D: usize>(x: Tensor<D>, op: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    op(x.cast(FloatDType::F32)).cast(dtype)
}

pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// GELU in its exact erf form (PyTorch's default). Written out because Burn's `gelu`
/// differentiates the tanh approximation instead.
pub fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * x.div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5)
}

/// Layer normalisation over the last dimension (PyTorch's `nn.LayerNorm`), in float32.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(init: &mut Init, dim: usize, eps: f64) -> Self {
        Self { weight: init.param([dim], |_| 1.0), bias: init.param([dim], |_| 0.0), eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let centered = x.clone() - x.mean_dim(D - 1);
        let inv_std = centered.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt().recip();
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        (centered * inv_std * self.weight.val().reshape(shape) + self.bias.val().reshape(shape)).cast(dtype)
    }
}

/// Multi-head scaled dot-product attention on token sequences: q [B, Lq, C], k and v
/// [B, Lk, C] -> [B, Lq, C], heads split along C; `causal` masks later keys (CLIP's text
/// tower). Weights in float32.
pub fn multihead_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, num_heads: usize, causal: bool) -> Tensor<3> {
    let [b, lq, c] = q.dims();
    let lk = k.dims()[1];
    let ch = c / num_heads;
    let dtype = v.dtype();
    let split = |t: Tensor<3>, l: usize| t.reshape([b, l, num_heads, ch]).swap_dims(1, 2).reshape([b * num_heads, l, ch]);
    let (q, k, v) = (split(q, lq), split(k, lk), split(v, lk));
    let mut scores = q.cast(FloatDType::F32).matmul(k.cast(FloatDType::F32).swap_dims(1, 2)).div_scalar((ch as f64).sqrt());
    if causal {
        let mask: Vec<f32> = (0..lq).flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::<3>::from_data(TensorData::new(mask, [1, lq, lk]), &scores.device());
        scores = scores + mask;
    }
    let weights = like(softmax(scores, 2), dtype);
    weights.matmul(v).reshape([b, num_heads, lq, ch]).swap_dims(1, 2).reshape([b, lq, c])
}

/// Sinusoidal embedding of the noise level (DDPM++ and ADM).
#[derive(Module, Debug)]
pub struct PositionalEmbedding {
    pub num_channels: usize,
    pub max_positions: usize,
    pub endpoint: bool,
}

impl PositionalEmbedding {
    pub fn forward(&self, x: Tensor<1>) -> Tensor<2> {
        let half = self.num_channels / 2;
        let denom = (half - usize::from(self.endpoint)) as f32;
        let base = 1.0f32 / self.max_positions as f32;
        let freqs: Vec<f32> = (0..half).map(|i| base.powf(i as f32 / denom)).collect();
        let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &x.device());
        outer_cos_sin(x, freqs)
    }
}

/// Random Fourier features of the noise level (NCSN++); `freqs` is a buffer of the checkpoint.
#[derive(Module, Debug)]
pub struct FourierEmbedding {
    pub freqs: Param<Tensor<1>>,
}

impl FourierEmbedding {
    pub fn new(init: &mut Init, num_channels: usize, scale: f64) -> Self {
        let values: Vec<f32> = (0..num_channels / 2)
            .map(|_| (init.rng.sample::<f64, _>(StandardNormal) * scale) as f32)
            .collect();
        Self { freqs: init.buffer(values, [num_channels / 2]) }
    }

    pub fn forward(&self, x: Tensor<1>) -> Tensor<2> {
        outer_cos_sin(x, self.freqs.val().mul_scalar(2.0 * std::f64::consts::PI))
    }
}

/// [cos(x f^T), sin(x f^T)] along the channel axis.
fn outer_cos_sin(x: Tensor<1>, freqs: Tensor<1>) -> Tensor<2> {
    let arg = x.unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>();
    Tensor::cat(vec![arg.clone().cos(), arg.sin()], 1)
}

#[derive(Module, Debug)]
pub enum NoiseEmbedding {
    Positional(PositionalEmbedding),
    Fourier(FourierEmbedding),
}

impl NoiseEmbedding {
    pub fn forward(&self, x: Tensor<1>) -> Tensor<2> {
        match self {
            Self::Positional(e) => e.forward(x),
            Self::Fourier(e) => e.forward(x),
        }
    }
}

/// Options of EDM's `UNetBlock` that differ between the architectures.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec<'a> {
    pub emb_channels: usize,
    /// `Some(n)`: n heads (SongUNet uses 1); `None`: out_channels / channels_per_head (ADM).
    pub num_heads: Option<usize>,
    pub channels_per_head: usize,
    pub dropout: f64,
    pub skip_scale: f64,
    pub eps: f64,
    pub resample_filter: &'a [f64],
    pub resample_proj: bool,
    pub adaptive_scale: bool,
    pub init: InitSpec,
    pub init_zero: InitSpec,
    pub init_attn: InitSpec,
}

/// EDM's unified residual block with optional up/down-sampling and self-attention.
#[derive(Module, Debug)]
pub struct UNetBlock {
    pub norm0: GroupNorm,
    pub conv0: Conv2d,
    pub affine: Linear,
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub skip: Option<Conv2d>,
    pub norm2: Option<GroupNorm>,
    pub qkv: Option<Conv2d>,
    pub proj: Option<Conv2d>,
    pub dropout: Dropout,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_heads: usize,
    pub skip_scale: f64,
    pub adaptive_scale: bool,
}

impl UNetBlock {
    pub fn new(init: &mut Init, in_channels: usize, out_channels: usize, resample: Resample, attention: bool, s: &BlockSpec) -> Self {
        let conv = |kernel, resample, init_spec| ConvSpec {
            kernel,
            bias: true,
            resample,
            resample_filter: s.resample_filter,
            fused_resample: false,
            init: init_spec,
        };
        let num_heads = if attention { s.num_heads.unwrap_or(out_channels / s.channels_per_head) } else { 0 };
        let norm0 = GroupNorm::new(init, in_channels, s.eps);
        let conv0 = Conv2d::new(init, in_channels, out_channels, conv(3, resample, s.init));
        let affine_out = out_channels * if s.adaptive_scale { 2 } else { 1 };
        let affine = Linear::new(init, s.emb_channels, affine_out, true, s.init);
        let norm1 = GroupNorm::new(init, out_channels, s.eps);
        let conv1 = Conv2d::new(init, out_channels, out_channels, conv(3, Resample::None, s.init_zero));
        let skip = (out_channels != in_channels || resample != Resample::None).then(|| {
            let kernel = if s.resample_proj || out_channels != in_channels { 1 } else { 0 };
            Conv2d::new(init, in_channels, out_channels, conv(kernel, resample, s.init))
        });
        let (norm2, qkv, proj) = if num_heads > 0 {
            (
                Some(GroupNorm::new(init, out_channels, s.eps)),
                Some(Conv2d::new(init, out_channels, out_channels * 3, conv(1, Resample::None, s.init_attn))),
                Some(Conv2d::new(init, out_channels, out_channels, conv(1, Resample::None, s.init_zero))),
            )
        } else {
            (None, None, None)
        };
        Self {
            norm0,
            conv0,
            affine,
            norm1,
            conv1,
            skip,
            norm2,
            qkv,
            proj,
            dropout: DropoutConfig::new(s.dropout).init(),
            in_channels,
            out_channels,
            num_heads,
            skip_scale: s.skip_scale,
            adaptive_scale: s.adaptive_scale,
        }
    }

    pub fn forward(&self, x: Tensor<4>, emb: Tensor<2>) -> Tensor<4> {
        let orig = x.clone();
        let x = self.conv0.forward(self.norm0.forward_silu(x, None));
        let params = like(self.affine.forward(emb), x.dtype());
        let x = if self.adaptive_scale {
            self.norm1.forward_silu(x, Some(params))
        } else {
            self.norm1.forward_silu(x + params.unsqueeze_dims::<4>(&[2, 3]), None)
        };
        let x = self.conv1.forward(self.dropout.forward(x));
        let skip = match &self.skip {
            Some(skip) => skip.forward(orig),
            None => orig,
        };
        let x = self.scale(x + skip);

        let (Some(norm2), Some(qkv), Some(proj)) = (&self.norm2, &self.qkv, &self.proj) else {
            return x;
        };
        let a = attention(qkv.forward(norm2.forward(x.clone())), self.num_heads);
        let x = proj.forward(a) + x;
        self.scale(x)
    }

    fn scale(&self, x: Tensor<4>) -> Tensor<4> {
        if self.skip_scale == 1.0 { x } else { x.mul_scalar(self.skip_scale) }
    }
}

/// Self-attention over the pixels of `qkv` [N, 3C, H, W] in EDM's channel layout (head,
/// channel-in-head, q|k|v interleaved) with `num_heads` heads: [N, C, H, W]. The weights are
/// computed in float32 whatever the body's dtype, as EDM's AttentionOp does.
pub fn attention(qkv: Tensor<4>, num_heads: usize) -> Tensor<4> {
    if on_flex_f32(&qkv) {
        // One operation each way on flex (`cpu_attention`).
        return crate::cpu_attention::attention(qkv, num_heads);
    }
    if cube_kernels(&qkv.device()) {
        // On CUDA too (`cube_attention`), in float32 whatever the body's dtype.
        return in_float32(qkv, |qkv| crate::cpu_attention::attention(qkv, num_heads));
    }
    let [n, c3, h, w] = qkv.dims();
    let (c, heads) = (c3 / 3, num_heads);
    let ch = c / heads;
    let qkv = qkv.reshape([n * heads, ch, 3, h * w]);
    let take = |i: usize| qkv.clone().narrow(2, i, 1).reshape([n * heads, ch, h * w]);
    let (q, k, v) = (take(0), take(1), take(2));
    let k = k.cast(FloatDType::F32).div_scalar((ch as f64).sqrt());
    let weights = like(softmax(q.cast(FloatDType::F32).swap_dims(1, 2).matmul(k), 2), v.dtype()); // [nh, q, k]
    v.matmul(weights.swap_dims(1, 2)).reshape([n, c, h, w]) // [nh, c, q] -> [N, C, H, W]
}

/// Classifier-free-guidance label dropout as EDM does it: whole label vectors zeroed with
/// probability `p`, only while training on an autodiff device.
pub fn label_dropout(labels: Tensor<2>, p: f64, training: &Param<Flag>) -> Tensor<2> {
    if p == 0.0 || !training.is_enabled() || !labels.device().is_autodiff() {
        return labels;
    }
    let n = labels.dims()[0];
    let keep = Tensor::<2>::random([n, 1], burn::tensor::Distribution::Uniform(0.0, 1.0), &labels.device())
        .greater_equal_elem(p)
        .float();
    labels * keep
}

/// An ordered, named container of sub-modules, as PyTorch's `ModuleDict`: parameters are
/// addressed by the entry's name (`enc.16x16_block0.conv0.weight`), not by an index.
#[derive(Debug, Clone)]
pub struct ModuleDict<T> {
    pub entries: Vec<(String, T)>,
}

impl<T> Default for ModuleDict<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T> ModuleDict<T> {
    pub fn insert(&mut self, name: impl Into<String>, module: T) {
        self.entries.push((name.into(), module));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(n, m)| (n.as_str(), m))
    }
}

impl<T: Module> Module for ModuleDict<T> {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        for (_, m) in &self.entries {
            devices = m.collect_devices(devices);
        }
        devices
    }

    fn fork(self, device: &Device) -> Self {
        Self { entries: self.entries.into_iter().map(|(n, m)| (n, m.fork(device))).collect() }
    }

    fn to_device(self, device: &Device) -> Self {
        Self { entries: self.entries.into_iter().map(|(n, m)| (n, m.to_device(device))).collect() }
    }

    fn train(self) -> Self {
        Self { entries: self.entries.into_iter().map(|(n, m)| (n, m.train())).collect() }
    }

    fn valid(&self) -> Self {
        Self { entries: self.entries.iter().map(|(n, m)| (n.clone(), m.valid())).collect() }
    }

    fn materialize(self) -> Self {
        Self { entries: self.entries.into_iter().map(|(n, m)| (n, m.materialize())).collect() }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        for (name, m) in &self.entries {
            visitor.enter_module(name, "ModuleDict");
            m.visit(visitor);
            visitor.exit_module(name, "ModuleDict");
        }
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let entries = self
            .entries
            .into_iter()
            .map(|(name, m)| {
                mapper.enter_module(&name, "ModuleDict");
                let m = m.map(mapper);
                mapper.exit_module(&name, "ModuleDict");
                (name, m)
            })
            .collect();
        Self { entries }
    }
}

impl<T: ModuleDisplay> ModuleDisplayDefault for ModuleDict<T> {
    fn content(&self, content: Content) -> Option<Content> {
        self.entries
            .iter()
            .fold(content, |acc, (name, m)| acc.add(name, m))
            .set_top_level_type("ModuleDict")
            .optional()
    }
}

impl<T: ModuleDisplay> ModuleDisplay for ModuleDict<T> {}
