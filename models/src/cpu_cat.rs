//! Concatenation along the channel axis (the UNet decoders' skip connections) as one
//! operation with its own backward, for Burn's flex CPU backend.
//!
//! Burn flex's `cat` copies on one thread while the other cores wait (~1% of an adm_tiny
//! training step, `perf`). Here each image's two channel blocks are copied in parallel, and
//! the backward pass hands each input a view of its channels of the gradient (no copy; the
//! kernels that read it copy views in parallel, `cpu_conv::contiguous`).
//!
//! `nn::cat_channels` sends float32 flex tensors here; other backends and dtypes use Burn's
//! `cat` (calling this on another backend panics: it is registered for flex only).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use crate::cpu_conv::{assume_init, contiguous, uninit, write_copy};
use rayon::prelude::*;

/// `a` [N, Ca, ...] and `b` [N, Cb, ...] (the other dimensions equal) as [N, Ca + Cb, ...].
#[backend_extension(Flex, Autodiff)]
pub trait ConcatBackend: Backend {
    fn cat_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients for `a` and `b`: the first `a_channels` channels of `grad`, and the rest.
    fn cat_channels_backward(grad: FloatTensor<Self>, a_channels: usize) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl ConcatBackend for Flex {
    fn cat_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return burn_cat::<Self>(a, b);
        }
        let (a, b) = (contiguous(&a), contiguous(&b));
        let (sa, sb) = (a.layout().shape().clone(), b.layout().shape().clone());
        let n = sa[0];
        let (la, lb) = (sa.num_elements() / n.max(1), sb.num_elements() / n.max(1));
        let (xa, xb) = (a.as_slice::<f32>().expect("contiguous"), b.as_slice::<f32>().expect("contiguous"));
        let mut out = uninit(n * (la + lb));
        out.par_chunks_mut((la + lb).max(1)).enumerate().for_each(|(i, image)| {
            let (to_a, to_b) = image.split_at_mut(la);
            write_copy(to_a, &xa[i * la..][..la]);
            write_copy(to_b, &xb[i * lb..][..lb]);
        });
        let mut shape = sa.clone();
        shape[1] = sa[1] + sb[1];
        // Safety: every image's two blocks were written.
        FlexTensor::from_data(TensorData::new(unsafe { assume_init(out) }, shape))
    }

    fn cat_channels_backward(grad: FloatTensor<Self>, a_channels: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let c = grad.layout().shape()[1];
        (grad.narrow(1, 0, a_channels), grad.narrow(1, a_channels, c - a_channels))
    }
}

fn burn_cat<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
    B::float_cat(vec![a, b], 1)
}

#[derive(Debug)]
struct CatGrad;

impl<B: Backend + ConcatBackend> Backward<B, 2> for CatGrad {
    type State = usize;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (ga, gb) = B::cat_channels_backward(grad, ops.state);
        for (node, g) in [(node_a, ga), (node_b, gb)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: Backend + ConcatBackend, C: CheckpointStrategy> ConcatBackend for Autodiff<B, C> {
    fn cat_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let a_channels = burn::backend::TensorMetadata::shape(&a)[1];
        match CatGrad.prepare::<C>([a.node(), b.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(a_channels, B::cat_channels(a.into_parts().0, b.into_parts().0)),
            OpsKind::UnTracked(prep) => prep.finish(B::cat_channels(a.into_parts().0, b.into_parts().0)),
        }
    }

    fn cat_channels_backward(_: FloatTensor<Self>, _: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("cat_channels_backward runs on the inner backend (no second-order gradients)")
    }
}

/// The channel concatenation through `ConcatBackend` (differentiable; flex).
pub fn cat_channels(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as ConcatBackend>::cat_channels(a.into_dispatch(), b.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Shape;

    /// The concatenation and its gradient split give Burn's `cat` and its inputs back, with
    /// a strided input (a channel slice) among them.
    #[test]
    fn cat_channels_matches_burn_cat_and_splits_back() {
        let values = |len: usize, seed: usize| (0..len).map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<f32>>();
        let a = FlexTensor::from_data(TensorData::new(values(3 * 4 * 5 * 2, 1), Shape::from([3, 4, 5, 2])));
        let wide = FlexTensor::from_data(TensorData::new(values(3 * 9 * 5 * 2, 2), Shape::from([3, 9, 5, 2])));
        let b = wide.narrow(1, 2, 6);
        let got = Flex::cat_channels(a.clone(), b.clone());
        let want = burn_cat::<Flex>(a.clone(), b.to_contiguous());
        assert_eq!(got.layout().shape(), want.layout().shape());
        assert_eq!(got.as_slice::<f32>().unwrap(), want.to_contiguous().as_slice::<f32>().unwrap());
        let (ga, gb) = Flex::cat_channels_backward(got, 4);
        assert_eq!(ga.to_contiguous().as_slice::<f32>().unwrap(), a.as_slice::<f32>().unwrap());
        assert_eq!(gb.to_contiguous().as_slice::<f32>().unwrap(), b.to_contiguous().as_slice::<f32>().unwrap());
    }
}
