//! FID: the Inception network against pytorch-fid (`../shared/reference/eval`, random weights
//! under pytorch-fid's names): 2048-d pool features of 64x64 images, pytorch-fid's
//! preprocessing.

mod common;

use common::*;
use dmd_models::inception::{FidInception, FidPreprocess};
use dmd_models::HostTensor;

#[test]
fn inception_features_match_pytorch_fid() {
    let Some(dir) = reference_dir("eval") else { return };
    let cases = read(&dir.join("inception_cases.safetensors"));
    // flex only: ndarray needs minutes for these eight 299x299 forwards.
    let device = burn::tensor::Device::flex();
    let net = FidInception::load(&dir.join("inception_fid_random.safetensors"), &device).unwrap_or_else(|e| panic!("{e}"));
    let pixels = get(&cases, "images_u8").to_tensor::<4>(&device);
    let f = HostTensor::from_tensor(net.features_of_pixels(pixels, FidPreprocess::PytorchFid));
    // The README of the case: a correct float32 port agrees to about 1e-4.
    assert_close("pool features (pytorch-fid preprocessing)", &f, get(&cases, "features"), 1e-4);
}
