//! `gemm_conv2d` on Burn's flex CPU backend: the forward pass and both gradients as blocked
//! window gathers + matrix products on the NCHW layout, without transposing the output. The
//! forward pass and the input gradient gather im2col blocks; the weight gradient gathers its
//! windows pixel-major instead (`im2row`, from a pixel-major copy of the input rows), which
//! `gemm` (after swapping the operands internally) reads in panels as it does the forward
//! pass's im2col block: ~1.3-1.7x faster than with the im2col block, on par with the forward
//! pass (results/bench/README.md).
//!
//! Burn flex's own `conv2d` converts the whole input to NHWC, multiplies per 512-pixel tile
//! into a fresh buffer and scatters it back transposed; its input gradient is a transposed
//! convolution with a col2im scatter and its weight gradient a convolution over swapped
//! batch/channel axes. Here each work unit is one image and a band of output rows: its
//! im2col block (kept under ~2 MB, in cache) is multiplied by the weight straight into the
//! output's rows. The matrix products are the `gemm` crate's (the one flex itself uses).
//! On adm_tiny's 3x3 convolutions this ran forward + backward ~2.5x faster than flex's
//! `conv2d` (results/bench/README.md).
//!
//! Deterministic: every output value is one product with a fixed summation order, and the
//! weight gradient sums a fixed number of partial products in a fixed order, whatever the
//! number of threads.
//!
//! `ConvBiasBackend` is the same convolution with its bias inside, for flex alone: the bias is
//! added to each unit's output rows while they are in cache, and its gradient summed from the
//! output gradient's band in the weight-gradient kernel. Added with Burn's broadcast ops
//! instead, the bias was a single-threaded pass forward and, backward, a single-threaded
//! reduction over batch and pixels after a contiguous copy: ~4% of an adm_tiny training step
//! with one core idle (`perf`, results/bench/README.md).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::gemm_conv::GemmConvBackend;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// The largest window block (floats, im2col or im2row) of one work unit: ~2 MB, about a
/// core's L2 cache. (`im2row`'s pixel-major copy of the input rows comes on top: at stride 1
/// about 1/(kh kw) of it.)
const COL_BLOCK: usize = 1 << 19;
/// The weight gradient's partial sums: a fixed count, so results do not depend on threads.
const WEIGHT_GRAD_PARTS: usize = 8;

/// One convolution's sizes: input [n, c, h, w], weight [o, c, kh, kw], output [n, o, ho, wo].
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    ph: usize,
    pw: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &Shape, weight: &Shape, stride: usize, ph: usize, pw: usize) -> Self {
        let (kh, kw) = (weight[2], weight[3]);
        assert_eq!(x[1], weight[1], "gemm_conv2d: input has {} channels, weight expects {}", x[1], weight[1]);
        assert!(kh <= x[2] + 2 * ph && kw <= x[3] + 2 * pw, "gemm_conv2d: kernel {kh}x{kw} larger than the padded input");
        Self {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: weight[0],
            kh,
            kw,
            stride,
            ph,
            pw,
            ho: (x[2] + 2 * ph - kh) / stride + 1,
            wo: (x[3] + 2 * pw - kw) / stride + 1,
        }
    }

    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn out_pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// Output rows per work unit: as many as keep the im2col block under `COL_BLOCK`.
    fn band_rows(&self) -> usize {
        (COL_BLOCK / (self.k() * self.wo).max(1)).clamp(1, self.ho)
    }

    /// Work units (image, first output row, row count), image-major.
    fn units(&self) -> Vec<(usize, usize, usize)> {
        let rows = self.band_rows();
        (0..self.n)
            .flat_map(|b| (0..self.ho).step_by(rows).map(move |r0| (b, r0, rows.min(self.ho - r0))))
            .collect()
    }

    /// Whether a 1x1, stride-1, unpadded convolution: the input image is its own im2col.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.ph == 0 && self.pw == 0
    }

    /// The output columns `lo..hi` whose input column ow * stride + j - pw, for kernel column
    /// `j`, lies inside the image (the others read padding).
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let (s, wo) = (self.stride, self.wo);
        let lo = self.pw.saturating_sub(j).div_ceil(s).min(wo);
        let hi = if self.w + self.pw > j { ((self.w + self.pw - j - 1) / s + 1).min(wo) } else { 0 };
        (lo, hi.max(lo))
    }

    /// The input row that output row `out_row` reads for kernel row `i`, if inside the image.
    fn input_row(&self, out_row: usize, i: usize) -> Option<usize> {
        (out_row * self.stride + i).checked_sub(self.ph).filter(|&ih| ih < self.h)
    }

    /// Fills `col` [k, rows * wo] with the input windows of image `b`'s output rows
    /// `r0..r0 + rows` (zeros where a window reaches into the padding).
    fn im2col(&self, x: &[f32], b: usize, r0: usize, rows: usize, col: &mut [f32]) {
        let (s, wo) = (self.stride, self.wo);
        let width = rows * wo;
        let image = &x[b * self.c * self.h * self.w..][..self.c * self.h * self.w];
        for c in 0..self.c {
            let plane = &image[c * self.h * self.w..][..self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((c * self.kh + i) * self.kw + j) * width..][..width];
                    let (lo, hi) = self.valid_cols(j);
                    if s == 1 && self.w == wo {
                        // "Same" padding: input and output rows have one length, so the
                        // valid rows are one shifted copy; the columns it wraps are zeroed.
                        let valid = |r: &usize| self.input_row(r0 + r, i).is_some();
                        let ra = (0..rows).find(valid).unwrap_or(rows);
                        let rb = (ra..rows).find(|r| !valid(r)).unwrap_or(rows);
                        row[..ra * wo].fill(0.0);
                        row[rb * wo..].fill(0.0);
                        if ra < rb && lo < hi {
                            let (start, end) = (ra * wo + lo, (rb - 1) * wo + hi);
                            let src = (r0 + ra + i - self.ph) * self.w + lo + j - self.pw;
                            row[start..end].copy_from_slice(&plane[src..src + end - start]);
                            // Column by column: the padding is a column or two, and a `fill`
                            // per row was a libc memset call per one or two values.
                            let band = &mut row[ra * wo..rb * wo];
                            for col in (0..lo).chain(hi..wo) {
                                band[col..].iter_mut().step_by(wo).for_each(|v| *v = 0.0);
                            }
                        } else {
                            row[ra * wo..rb * wo].fill(0.0);
                        }
                        continue;
                    }
                    for (r, seg) in row.chunks_exact_mut(wo).enumerate() {
                        let Some(ih) = self.input_row(r0 + r, i) else {
                            seg.fill(0.0);
                            continue;
                        };
                        let src = &plane[ih * self.w..][..self.w];
                        seg[..lo].fill(0.0);
                        seg[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        let first = lo * s + j - self.pw;
                        if s == 1 {
                            seg[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (k, v) in seg[lo..hi].iter_mut().enumerate() {
                                *v = src[first + k * s];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Fills `out` [rows * wo, k] with the windows of image `b`'s output rows `r0..r0 + rows`,
    /// one row per output pixel in the order (i, j, c). The input rows read go first into
    /// `pixels` pixel-major with the padding around them ([rows_in, w + 2 pw, c], zeros in
    /// the padding), where each kernel row of a window is kw * c contiguous values: kh plain
    /// copies per output pixel, no tests for the edges.
    fn im2row(&self, x: &[f32], b: usize, r0: usize, rows: usize, pixels: &mut Vec<f32>, out: &mut [f32]) {
        let (c, s, k, kw) = (self.c, self.stride, self.k(), self.kw);
        let image = &x[b * c * self.h * self.w..][..c * self.h * self.w];
        if self.pointwise() {
            // The pixel-major copy of the rows is itself the block.
            transpose(&image[r0 * self.w..], self.h * self.w, c, rows * self.w, out);
            return;
        }
        let wp = self.w + 2 * self.pw;
        // Padded input rows top..top + rows_in, padded row index = input row + ph.
        let top = r0 * s;
        let rows_in = (rows - 1) * s + self.kh;
        pixels.resize(rows_in * wp * c, 0.0);
        for (pr, row) in pixels.chunks_exact_mut(wp * c).enumerate() {
            let Some(ih) = (top + pr).checked_sub(self.ph).filter(|&ih| ih < self.h) else {
                row.fill(0.0);
                continue;
            };
            let (left, rest) = row.split_at_mut(self.pw * c);
            let (inside, right) = rest.split_at_mut(self.w * c);
            left.fill(0.0);
            right.fill(0.0);
            transpose(&image[ih * self.w..], self.h * self.w, c, self.w, inside);
        }
        let run = kw * c;
        for (px, window) in out.chunks_exact_mut(k).enumerate() {
            let (oh, ow) = (px / self.wo, px % self.wo);
            for (i, dst) in window.chunks_exact_mut(run).enumerate() {
                let src = &pixels[((oh * s + i) * wp + ow * s) * c..][..run];
                copy_short(dst, src);
            }
        }
    }

    /// The window matrix [k, rows * wo] of image `b`'s output rows `r0..r0 + rows` as a
    /// product operand (pointer, row stride, column stride): the input image itself for a
    /// pointwise convolution, otherwise its im2col block written into `col`.
    fn windows(&self, x: &[f32], b: usize, r0: usize, rows: usize, col: &mut Vec<f32>) -> (*const f32, isize, isize) {
        let (k, p, width) = (self.k(), self.out_pixels(), rows * self.wo);
        if self.pointwise() {
            return (x[b * k * p + r0 * self.wo..].as_ptr(), p as isize, 1);
        }
        col.resize(k * width, 0.0);
        self.im2col(x, b, r0, rows, col);
        (col.as_ptr(), width as isize, 1)
    }

    /// Adds `col` [k, rows * wo] (gradients of image `b`'s windows for output rows
    /// `r0..r0 + rows`) back onto the input positions they were read from, in `dx_image`.
    fn col2im_add(&self, col: &[f32], r0: usize, rows: usize, dx_image: &mut [f32]) {
        let (s, wo) = (self.stride, self.wo);
        let width = rows * wo;
        for c in 0..self.c {
            let plane = &mut dx_image[c * self.h * self.w..][..self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &col[((c * self.kh + i) * self.kw + j) * width..][..width];
                    let (lo, hi) = self.valid_cols(j);
                    for (r, seg) in row.chunks_exact(wo).enumerate() {
                        let Some(ih) = self.input_row(r0 + r, i).filter(|_| lo < hi) else {
                            continue;
                        };
                        let dst = &mut plane[ih * self.w..][..self.w];
                        let first = lo * s + j - self.pw;
                        for (k, v) in seg[lo..hi].iter().enumerate() {
                            dst[first + k * s] += v;
                        }
                    }
                }
            }
        }
    }
}

/// `len` floats left uninitialised, for an output every value of which a kernel writes: no
/// serial zeroing pass on the calling thread before the parallel work.
pub(crate) fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // Safety: MaybeUninit values need no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// Safety: every value of `v` has been written.
pub(crate) unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity())
}

/// Writes `src` into `dst` (same length), a copy into an output left uninitialised.
pub(crate) fn write_copy(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| {
        d.write(*s);
    });
}

/// `t` in row-major order: `t` itself where it already is (no copy), otherwise its rows
/// copied in parallel where the last dimension is contiguous (the views autodiff hands to a
/// backward pass: a concatenation's gradient sliced per input, say), else Burn's copy. Burn
/// flex's own copy runs on one thread, the other core idle.
pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let dims = shape.num_dims();
    if layout.is_contiguous() || t.dtype() != DType::F32 || dims < 2 || strides[dims - 1] != 1 || strides.iter().any(|s| *s < 0) {
        return t.to_contiguous();
    }
    let (row, len) = (shape[dims - 1], shape.num_elements());
    let (storage, start) = (t.storage::<f32>(), layout.start_offset());
    // The storage offset of row `r` (row-major over the leading dimensions).
    let row_start = |mut r: usize| {
        let mut offset = start;
        for d in (0..dims - 1).rev() {
            offset += r % shape[d] * strides[d] as usize;
            r /= shape[d];
        }
        offset
    };
    let mut out = uninit(len);
    // Tasks of at least ~16k values: rows can be as short as 8.
    let rows_per_task = (16384 / row.max(1)).max(1);
    out.par_chunks_mut(row * rows_per_task).enumerate().for_each(|(task, dst)| {
        for (i, dst) in dst.chunks_exact_mut(row).enumerate() {
            write_copy(dst, &storage[row_start(task * rows_per_task + i)..][..row]);
        }
    });
    // Safety: every row was written.
    tensor(unsafe { assume_init(out) }, shape.clone())
}

/// A raw pointer that work units on other threads write through, each to its own region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, each matrix given by its pointer and (row, column)
/// strides in elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    parallel: bool,
) {
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    gemm::gemm(
        m, n, k, dst.0, dst.2, dst.1, accumulate, lhs.0, lhs.2, lhs.1, rhs.0, rhs.2, rhs.1,
        if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, parallelism,
    );
}

/// Runs `work` on every unit: in parallel across units (each product single-threaded) where
/// there are enough of them, otherwise one after another with multi-threaded products.
fn for_units<U: Sync>(units: &[U], work: impl Fn(&U, &mut Vec<f32>, bool) + Sync + Send) {
    if units.len() >= 2 * rayon::current_num_threads() {
        units.par_iter().for_each(|u| with_scratch(0, |col| work(u, col, false)));
    } else {
        with_scratch(0, |col| units.iter().for_each(|u| work(u, col, true)));
    }
}

/// Runs `f` with this thread's scratch vector number `slot` (0 or 1), kept between calls so
/// that work units neither allocate nor zero their blocks each time (`resize` fills only
/// what is new, and every kernel overwrites what it uses). Where the slot is already in use
/// (this thread picked up another convolution's unit while waiting), a fresh vector.
fn with_scratch<R>(slot: usize, f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    thread_local!(static SCRATCH: [RefCell<Vec<f32>>; 2] = const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] });
    SCRATCH.with(|s| match s[slot].try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Vec::new()),
    })
}

/// The forward convolution of `x` [n, c, h, w] by `weight` [o, c, kh, kw], plus `bias` [o]
/// where given (added to each unit's rows while they are in cache).
fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let (k, p) = (g.k(), g.out_pixels());
    let mut out = uninit(g.n * g.o * p);
    let out_ptr = SharedMut(out.as_mut_ptr().cast());
    for_units(&g.units(), |&(b, r0, rows), col, parallel| {
        let width = rows * g.wo;
        let rhs = g.windows(x, b, r0, rows, col);
        let out_ptr = out_ptr;
        // Safety: unit (b, r0) writes only output columns r0 * wo .. + width of image b.
        unsafe {
            let dst = out_ptr.0.add(b * g.o * p + r0 * g.wo);
            matmul(g.o, width, k, (dst, p as isize, 1), false, (weight.as_ptr(), k as isize, 1), rhs, parallel);
            for (o, bias_o) in bias.into_iter().flatten().enumerate() {
                std::slice::from_raw_parts_mut(dst.add(o * p), width).iter_mut().for_each(|v| *v += bias_o);
            }
        }
    });
    // Safety: the units cover every output row of every image, each written by one product.
    unsafe { assume_init(out) }
}

/// The gradients for `weight` [o, c, kh, kw] and for a bias [o] given the input `x` and the
/// output gradient `dy`.
fn weight_grad(x: &[f32], dy: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>) {
    let units = g.units();
    let per_part = units.len().div_ceil(WEIGHT_GRAD_PARTS).max(1);
    let parts: Vec<&[(usize, usize, usize)]> = units.chunks(per_part).collect();
    let mut partial_sums: Vec<Vec<f32>> = if parts.len() >= 2 {
        parts.par_iter().map(|part| weight_grad_part(x, dy, g, part, false)).collect()
    } else {
        parts.iter().map(|part| weight_grad_part(x, dy, g, part, true)).collect()
    };
    // The parts summed in order, in place into the first (contiguous runs, in parallel);
    // then each output channel's row permuted from the window order (i, j, c) back to the
    // weight's (c, i, j).
    let (k, o, taps) = (g.k(), g.o, g.kh * g.kw);
    let Some((sum, rest)) = partial_sums.split_first_mut() else {
        return (vec![0.0; o * k], vec![0.0; o]);
    };
    const RUN: usize = 4096;
    sum.par_chunks_mut(RUN).enumerate().for_each(|(i, run)| {
        for part in rest.iter() {
            run.iter_mut().zip(&part[i * RUN..]).for_each(|(a, b)| *a += b);
        }
    });
    let mut dw = vec![0.0f32; o * k];
    dw.par_chunks_mut(k).zip(sum.par_chunks(k)).for_each(|(row, src)| transpose(src, g.c, taps, g.c, row));
    (dw, sum[k * o..].to_vec())
}

/// One part's sum over its units of dy[b, :, band] [o, width] * rows [width, k], that is the
/// weight gradient with its columns in the window order (i, j, c), followed by the part's
/// sums of dy per output channel (the bias gradient, [o]). `rows` holds one window per
/// output pixel, contiguous (`im2row`). `gemm` computes the transposed product (its output's
/// rows are contiguous), where `rows` becomes the left operand, read in panels down its
/// columns like the forward pass's im2col block. With the im2col block [k, width] against a
/// transposed dy instead, the windows were the broadcast operand (six columns 1 KB apart)
/// and the weight gradient ran ~1.3-1.7x slower than the forward pass.
fn weight_grad_part(x: &[f32], dy: &[f32], g: &Geometry, units: &[(usize, usize, usize)], parallel: bool) -> Vec<f32> {
    let (k, p) = (g.k(), g.out_pixels());
    let mut dw = vec![0.0f32; (k + 1) * g.o];
    let (dw_part, db_part) = dw.split_at_mut(k * g.o);
    with_scratch(0, |rows_block| {
        with_scratch(1, |pixels| {
            for (u, &(b, r0, rows)) in units.iter().enumerate() {
                let width = rows * g.wo;
                rows_block.resize(width * k, 0.0);
                g.im2row(x, b, r0, rows, pixels, rows_block);
                let band = &dy[b * g.o * p + r0 * g.wo..];
                for (o, db) in db_part.iter_mut().enumerate() {
                    let band_o = &band[o * p..][..width];
                    *db += lane_sum(band_o, band_o, |v, _| v);
                }
                let (lhs, rhs) = ((band.as_ptr(), p as isize, 1), (rows_block.as_ptr(), k as isize, 1));
                // Safety: all pointers index inside their slices (shapes from `g`).
                unsafe { matmul(g.o, k, width, (dw_part.as_mut_ptr(), k as isize, 1), u > 0, lhs, rhs, parallel) };
            }
        })
    });
    dw
}

/// The sum of `f(x[i], y[i])` in eight interleaved lanes (vectorises; a fixed order, so
/// deterministic): the bias gradient's sums here (a left-to-right sum waiting on each
/// addition had been ~6% of the weight gradient's time), group norm's statistics and sums.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (xs, ys) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(a, b)| f(*a, *b)).sum();
    for (xc, yc) in xs.zip(ys) {
        for i in 0..8 {
            lanes[i] += f(xc[i], yc[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `dst` = `src` (same length) in 8-value moves on the calling thread, not a `memcpy` call
/// per few hundred bytes.
#[inline]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // Safety: the CPU has AVX; both slices hold `len` values.
        return unsafe { copy_avx(dst.as_mut_ptr(), src.as_ptr(), dst.len()) };
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_avx(dst: *mut f32, src: *const f32, len: usize) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 32 <= len {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(src.add(i + 8 * j)));
        for (j, v) in v.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(i + 8 * j), v);
        }
        i += 32;
    }
    while i + 8 <= len {
        _mm256_storeu_ps(dst.add(i), _mm256_loadu_ps(src.add(i)));
        i += 8;
    }
    while i < len {
        *dst.add(i) = *src.add(i);
        i += 1;
    }
}

/// `dst` [cols, rows] = the transpose of the `rows` x `cols` block of `src` whose rows start
/// `src_stride` apart: in 8 x 8 blocks transposed in AVX registers where the CPU has AVX
/// (the pixel-major copies of `im2row` had cost as much as its windows, value by value).
pub(crate) fn transpose(src: &[f32], src_stride: usize, rows: usize, cols: usize, dst: &mut [f32]) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (rows - 1) * src_stride + cols && dst.len() >= rows * cols, "transpose: slices too short");
    let (full_rows, full_cols) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        for r0 in (0..full_rows).step_by(8) {
            for c0 in (0..full_cols).step_by(8) {
                // Safety: the CPU has AVX; the block lies inside both slices (asserted above).
                unsafe { transpose_8x8(src[r0 * src_stride + c0..].as_ptr(), src_stride, dst[c0 * rows + r0..].as_mut_ptr(), rows) };
            }
        }
        transpose_scalar(src, src_stride, rows, full_rows..rows, 0..cols, dst);
        transpose_scalar(src, src_stride, rows, 0..full_rows, full_cols..cols, dst);
        return;
    }
    transpose_scalar(src, src_stride, rows, 0..rows, 0..cols, dst);
}

/// `transpose` of the rows `rs` and columns `cs` alone, value by value in 16 x 16 tiles.
fn transpose_scalar(src: &[f32], src_stride: usize, rows: usize, rs: std::ops::Range<usize>, cs: std::ops::Range<usize>, dst: &mut [f32]) {
    const T: usize = 16;
    for r0 in rs.clone().step_by(T) {
        for c0 in cs.clone().step_by(T) {
            for r in r0..(r0 + T).min(rs.end) {
                let src_row = &src[r * src_stride..];
                for c in c0..(c0 + T).min(cs.end) {
                    dst[c * rows + r] = src_row[c];
                }
            }
        }
    }
}

/// The 8 x 8 block at `src` (rows `src_stride` apart) transposed into `dst` (rows
/// `dst_stride` apart): pairs interleaved, then quads, then the 128-bit halves swapped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
    });
    // q[4h + m]: rows 4h..4h + 4 of columns {m, m + 4} (lane-wise), from t[4h..4h + 4].
    let q: [__m256; 8] = std::array::from_fn(|i| {
        let (h, m) = (i / 4, i % 4);
        let (a, b) = (t[4 * h + m / 2], t[4 * h + m / 2 + 2]);
        if m % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
    });
    for m in 0..4 {
        _mm256_storeu_ps(dst.add(m * dst_stride), _mm256_permute2f128_ps::<0x20>(q[m], q[4 + m]));
        _mm256_storeu_ps(dst.add((m + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(q[m], q[4 + m]));
    }
}

/// The gradient for `x` [n, c, h, w] given `weight` and the output gradient `dy`.
fn input_grad(weight: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    if g.stride == 1 && g.ph < g.kh && g.pw < g.kw {
        // At stride 1 the input gradient is itself a convolution: of dy by the weight with
        // input and output channels swapped and the kernel flipped, padded by k - 1 - pad.
        let (c, o, kh, kw) = (g.c, g.o, g.kh, g.kw);
        let mut flipped = vec![0.0f32; weight.len()];
        for oc in 0..o {
            for ic in 0..c {
                for i in 0..kh {
                    for j in 0..kw {
                        flipped[((ic * o + oc) * kh + kh - 1 - i) * kw + kw - 1 - j] = weight[((oc * c + ic) * kh + i) * kw + j];
                    }
                }
            }
        }
        let transposed = Geometry::new(
            &Shape::from([g.n, o, g.ho, g.wo]),
            &Shape::from([c, o, kh, kw]),
            1,
            kh - 1 - g.ph,
            kw - 1 - g.pw,
        );
        debug_assert_eq!((transposed.ho, transposed.wo), (g.h, g.w));
        return forward(dy, &flipped, None, &transposed);
    }
    // Otherwise: each image's window gradients W^T dy, added back where they were read.
    let (k, p, image) = (g.k(), g.out_pixels(), g.c * g.h * g.w);
    let mut dx = vec![0.0f32; g.n * image];
    let rows = g.band_rows();
    let images: Vec<usize> = (0..g.n).collect();
    let dx_ptr = SharedMut(dx.as_mut_ptr());
    for_units(&images, |&b, col, parallel| {
        let dx_ptr = dx_ptr;
        // Safety: image b's gradient is written by this unit alone.
        let dx_image = unsafe { std::slice::from_raw_parts_mut(dx_ptr.0.add(b * image), image) };
        for r0 in (0..g.ho).step_by(rows) {
            let rows = rows.min(g.ho - r0);
            let width = rows * g.wo;
            col.resize(k * width, 0.0);
            let lhs = (weight.as_ptr(), 1, k as isize);
            let rhs = (dy[b * g.o * p + r0 * g.wo..].as_ptr(), p as isize, 1);
            unsafe { matmul(k, width, g.o, (col.as_mut_ptr(), width as isize, 1), false, lhs, rhs, parallel) };
            g.col2im_add(col, r0, rows, dx_image);
        }
    });
    dx
}

/// The input, weight and output gradient as float32 slices, or `None` for other dtypes
/// (those keep Burn's kernels).
fn f32_contiguous(tensors: &[&FlexTensor]) -> Option<Vec<FlexTensor>> {
    tensors
        .iter()
        .map(|t| (t.dtype() == DType::F32).then(|| contiguous(t)))
        .collect()
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous float32 tensor")
}

fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// The forward convolution (plus `bias` where given), or `None` where a dtype is not float32.
pub(crate) fn conv2d(x: &FlexTensor, weight: &FlexTensor, bias: Option<&FlexTensor>, stride: usize, ph: usize, pw: usize) -> Option<FlexTensor> {
    let [x, weight] = <[FlexTensor; 2]>::try_from(f32_contiguous(&[x, weight])?).ok()?;
    let bias = match bias {
        Some(b) => Some(f32_contiguous(&[b])?.remove(0)),
        None => None,
    };
    let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, ph, pw);
    Some(tensor(forward(slice(&x), slice(&weight), bias.as_ref().map(slice), &g), Shape::from([g.n, g.o, g.ho, g.wo])))
}

/// The input gradient, or `None` where a dtype is not float32.
pub(crate) fn conv2d_x_backward(x: &FlexTensor, weight: &FlexTensor, grad: &FlexTensor, stride: usize, ph: usize, pw: usize) -> Option<FlexTensor> {
    let [weight, grad] = <[FlexTensor; 2]>::try_from(f32_contiguous(&[weight, grad])?).ok()?;
    let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, ph, pw);
    Some(tensor(input_grad(slice(&weight), slice(&grad), &g), x.layout().shape().clone()))
}

/// The weight and bias gradients, or `None` where a dtype is not float32.
pub(crate) fn conv2d_weight_bias_backward(x: &FlexTensor, weight: &FlexTensor, grad: &FlexTensor, stride: usize, ph: usize, pw: usize) -> Option<(FlexTensor, FlexTensor)> {
    let [x, grad] = <[FlexTensor; 2]>::try_from(f32_contiguous(&[x, grad])?).ok()?;
    let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, ph, pw);
    let (dw, db) = weight_grad(slice(&x), slice(&grad), &g);
    Some((tensor(dw, weight.layout().shape().clone()), tensor(db, Shape::from([g.o]))))
}

/// The weight gradient, or `None` where a dtype is not float32.
pub(crate) fn conv2d_weight_backward(x: &FlexTensor, weight: &FlexTensor, grad: &FlexTensor, stride: usize, ph: usize, pw: usize) -> Option<FlexTensor> {
    conv2d_weight_bias_backward(x, weight, grad, stride, ph, pw).map(|(dw, _)| dw)
}

/// `x` [N, C, H, W] convolved with `weight` [O, C, kh, kw] at `stride` with zero padding
/// `pad_h`, `pad_w`, plus `bias` [O] per output channel.
// CubeCL: in `gemm_conv` (see models/build.rs for `cube_kernels`).
#[backend_extension(Flex, Cube: cfg(cube_kernels), Autodiff)]
pub trait ConvBiasBackend: Backend {
    fn conv2d_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self>;

    /// The gradients for `weight` and `bias` given the output's gradient `grad`.
    fn conv2d_bias_param_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Float32 runs this file's kernels; other dtypes Burn's `conv2d` and its backward ops.
impl ConvBiasBackend for Flex {
    fn conv2d_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        conv2d(&x, &weight, Some(&bias), stride, pad_h, pad_w).unwrap_or_else(|| burn_conv2d_bias::<Self>(x, weight, bias, stride, pad_h, pad_w))
    }

    fn conv2d_bias_param_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
        conv2d_weight_bias_backward(&x, &weight, &grad, stride, pad_h, pad_w).unwrap_or_else(|| burn_conv2d_bias_param_backward::<Self>(x, weight, grad, stride, pad_h, pad_w))
    }
}

fn burn_conv2d_bias<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: FloatTensor<B>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<B> {
    B::conv2d(x, weight, Some(bias), ConvOptions::new([stride, stride], [pad_h, pad_w], [1, 1], 1))
}

fn burn_conv2d_bias_param_backward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad_h: usize, pad_w: usize) -> (FloatTensor<B>, FloatTensor<B>) {
    let o = weight.shape()[0];
    let db = [0, 2, 3].into_iter().fold(grad.clone(), B::float_sum_dim);
    let dw = B::conv2d_weight_backward(x, weight, grad, ConvOptions::new([stride, stride], [pad_h, pad_w], [1, 1], 1));
    (dw, B::float_reshape(db, Shape::from([o])))
}

/// The backward pass: the input gradient from `GemmConvBackend`, the weight and bias
/// gradients together, from the saved input and the weight in the kernels' layout
/// (`GemmConvBackend::gemm_conv2d_weight_layout`).
#[derive(Debug)]
struct ConvBiasBackward;

impl<B: Backend + GemmConvBackend + ConvBiasBackend> Backward<B, 3> for ConvBiasBackward {
    type State = (NodeId, B::FloatTensorPrimitive, [usize; 3]);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight, [stride, ph, pw]) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::gemm_conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), stride, ph, pw));
        }
        if node_weight.is_some() || node_bias.is_some() {
            let (dw, db) = B::conv2d_bias_param_backward(x, weight, grad, stride, ph, pw);
            for (node, g) in [(node_weight, dw), (node_bias, db)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, g);
                }
            }
        }
    }
}

impl<B: Backend + GemmConvBackend + ConvBiasBackend, C: CheckpointStrategy> ConvBiasBackend for Autodiff<B, C> {
    fn conv2d_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: usize, pad_h: usize, pad_w: usize) -> FloatTensor<Self> {
        match ConvBiasBackward.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let weight = B::gemm_conv2d_weight_layout(weight.into_parts().0);
                let state = (prep.checkpoint(&x), weight.clone(), [stride, pad_h, pad_w]);
                let out = B::conv2d_bias(x.into_parts().0, weight, bias.into_parts().0, stride, pad_h, pad_w);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_bias(x.into_parts().0, weight.into_parts().0, bias.into_parts().0, stride, pad_h, pad_w)),
        }
    }

    fn conv2d_bias_param_backward(_: FloatTensor<Self>, _: FloatTensor<Self>, _: FloatTensor<Self>, _: usize, _: usize, _: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("conv2d_bias_param_backward runs on the inner backend (no second-order gradients)")
    }
}

/// The convolution plus bias through `ConvBiasBackend` (differentiable; flex, and CubeCL
/// devices where `nn::cube_kernels`).
pub fn conv2d_bias(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, stride: usize, padding: [usize; 2]) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as ConvBiasBackend>::conv2d_bias(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), stride, padding[0], padding[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 40503) % 65536) as f32 / 65536.0) - 0.5).collect()
    }

    /// The convolution's forward pass and both gradients by its definition, in f64:
    /// y[b, o, oh, ow] = sum over c, i, j of w[o, c, i, j] * x[b, c, oh*s + i - ph, ow*s + j - pw].
    /// With a bias: y[b, o, ...] += bias[o], and its gradient dbias[o] = sum of dy[b, o, ...].
    #[allow(clippy::type_complexity)]
    fn direct(x: &[f32], w: &[f32], bias: &[f32], dy: &[f32], g: &Geometry) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut dx, mut dw, mut db) = (vec![0.0; g.n * g.o * g.ho * g.wo], vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; g.o]);
        for b in 0..g.n {
            for o in 0..g.o {
                for oh in 0..g.ho {
                    for ow in 0..g.wo {
                        let yi = ((b * g.o + o) * g.ho + oh) * g.wo + ow;
                        y[yi] += bias[o] as f64;
                        db[o] += dy[yi] as f64;
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let (ih, iw) = ((oh * g.stride + i) as isize - g.ph as isize, (ow * g.stride + j) as isize - g.pw as isize);
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                        continue;
                                    }
                                    let xi = ((b * g.c + c) * g.h + ih as usize) * g.w + iw as usize;
                                    let wi = ((o * g.c + c) * g.kh + i) * g.kw + j;
                                    y[yi] += w[wi] as f64 * x[xi] as f64;
                                    dx[xi] += w[wi] as f64 * dy[yi] as f64;
                                    dw[wi] += x[xi] as f64 * dy[yi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw, db)
    }

    fn rel_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    /// Relative errors of the output, input gradient, weight gradient and bias gradient
    /// against `direct`, for input, weight, output gradient and bias drawn from seeds
    /// `seed..seed + 4`.
    fn errors_against_definition(g: &Geometry, seed: u64) -> [f64; 4] {
        let x = values(g.n * g.c * g.h * g.w, seed);
        let weight = values(g.o * g.k(), seed + 1);
        let dy = values(g.n * g.o * g.ho * g.wo, seed + 2);
        let bias = values(g.o, seed + 3);
        let (y, dx, dw, db) = direct(&x, &weight, &bias, &dy, g);
        let (got_dw, got_db) = weight_grad(&x, &dy, g);
        [
            rel_error(&forward(&x, &weight, Some(&bias), g), &y),
            rel_error(&input_grad(&weight, &dy, g), &dx),
            rel_error(&got_dw, &dw),
            rel_error(&got_db, &db),
        ]
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        // (n, c, h, w, o, kh, kw, stride, ph, pw): "same" 3x3; unpadded (output narrower than
        // the input); 1x1; 1x7 and 7x1 as in Inception; a GAN head's 4x4 stride 2; stride 3
        // with a 5x5 kernel and padding 2; one output channel; more padding than "same".
        let cases = [
            (3, 4, 9, 7, 5, 3, 3, 1, 1, 1),
            (2, 3, 8, 8, 4, 3, 3, 1, 0, 0),
            (2, 6, 5, 4, 3, 1, 1, 1, 0, 0),
            (2, 3, 6, 10, 4, 1, 7, 1, 0, 3),
            (2, 3, 10, 6, 4, 7, 1, 1, 3, 0),
            (3, 4, 8, 8, 6, 4, 4, 2, 1, 1),
            (2, 5, 11, 11, 7, 5, 5, 3, 2, 2),
            (2, 3, 7, 7, 1, 3, 3, 1, 1, 1),
            (2, 2, 5, 5, 3, 3, 3, 1, 2, 2),
            // 1x1 at stride 2 with more padding than the kernel; a 2x2 kernel at stride 3
            // (rows no window reads); a 3x2 kernel at stride 2; odd channel counts.
            (2, 7, 6, 5, 3, 1, 1, 2, 3, 2),
            (2, 3, 8, 7, 4, 2, 2, 3, 4, 5),
            (3, 17, 7, 3, 5, 3, 2, 2, 1, 0),
        ];
        for (n, c, h, w, o, kh, kw, stride, ph, pw) in cases {
            let g = Geometry::new(&Shape::from([n, c, h, w]), &Shape::from([o, c, kh, kw]), stride, ph, pw);
            let errors = errors_against_definition(&g, 1);
            assert!(errors.iter().all(|e| *e < 1e-6), "{g:?}: relative errors (output, input gradient, weight gradient, bias gradient) {errors:?}");
        }
    }

    /// The parallel row copy gives Burn's own copy of each view: a channel slice of a
    /// concatenation (what autodiff passes back), a transpose of the last two dimensions
    /// (not row-contiguous: Burn's copy), and a tensor that is already contiguous.
    #[test]
    fn contiguous_copies_views_as_burn_does() {
        let base = tensor(values(3 * 10 * 7 * 5, 8), Shape::from([3, 10, 7, 5]));
        for view in [base.narrow(1, 4, 5), base.narrow(1, 0, 1).narrow(2, 2, 3), base.transpose(2, 3), base.clone()] {
            let (got, want) = (contiguous(&view), view.to_contiguous());
            assert!(got.is_contiguous());
            assert_eq!(got.layout().shape(), want.layout().shape());
            assert_eq!(slice(&got), slice(&want), "{:?}", view.layout());
        }
    }

    #[test]
    fn an_empty_batch_has_zero_gradients() {
        let g = Geometry::new(&Shape::from([0, 3, 5, 5]), &Shape::from([4, 3, 3, 3]), 1, 1, 1);
        let (dw, db) = weight_grad(&[], &[], &g);
        assert_eq!((dw, db), (vec![0.0; 4 * 27], vec![0.0; 4]));
        assert!(forward(&[], &values(4 * 27, 1), None, &g).is_empty());
    }

    #[test]
    fn transpose_matches_its_definition() {
        for (rows, cols, stride) in [(8, 8, 8), (16, 24, 30), (19, 13, 13), (5, 33, 40), (32, 16, 256), (1, 9, 9), (9, 1, 4)] {
            let src = values((rows - 1) * stride + cols, 9);
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, stride, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * stride + c], "{rows}x{cols} (stride {stride}) at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn bands_and_parts_change_nothing_but_the_order_of_sums() {
        // Inputs large enough for several row bands per image (COL_BLOCK), 3x3 and pointwise
        // (whose windows are the input itself), and a batch that does not divide into
        // WEIGHT_GRAD_PARTS parts evenly. The pointwise case's float32 sums run over 4000
        // channels, hence its looser bound (the forward pass, unchanged by im2row, is 1.3e-6 off).
        for (n, c, h, o, k, pad, tolerance) in [(11, 64, 40, 8, 3, 1, 1e-6), (3, 4000, 12, 3, 1, 0, 4e-6)] {
            let g = Geometry::new(&Shape::from([n, c, h, h]), &Shape::from([o, c, k, k]), 1, pad, pad);
            assert!(g.band_rows() < g.ho, "one band per image: the test would not cover bands");
            let errors = errors_against_definition(&g, 4);
            assert!(errors.iter().all(|e| *e < tolerance), "{g:?}: relative errors {errors:?}");
        }
    }
}
