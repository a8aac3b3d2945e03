//! The bfloat16 network body (DMD2's mixed precision): float32 master weights cast at use,
//! preconditioning, group norms and attention weights in float32. On flex (ndarray has no
//! bfloat16), the denoiser stays within bfloat16 rounding of EDM's float32 output, and the
//! parameter gradients come back in float32, close to the float32 ones.

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor};
use common::*;
use dmd_models::weights::param_id;
use dmd_models::{EdmPrecond, HostTensor};

#[test]
fn bf16_body_stays_within_bf16_rounding_of_edm() {
    let Some(dir) = reference_dir("edm") else { return };
    for name in ["adm_tiny", "ddpmpp_tiny"] {
        let cases = read(&dir.join(format!("{name}_cases.safetensors")));
        let ad = Device::flex().autodiff();
        let load = |bf16: bool| {
            EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), &ad, "net").unwrap().with_bf16_body(bf16)
        };
        let run = |net: &EdmPrecond| {
            let x = get(&cases, "denoise_x").to_tensor::<4>(&ad);
            let out = net.forward(x, get(&cases, "denoise_sigma").to_tensor(&ad), Some(get(&cases, "denoise_labels").to_tensor(&ad)));
            assert_eq!(out.dtype(), DType::F32, "the denoiser's output is float32");
            // A fixed linear functional of the output, to compare parameter gradients.
            let r = out.clone().inner().sin();
            let mut grads = (out.clone() * Tensor::from_inner(r)).sum().backward();
            (HostTensor::from_tensor(out.inner()), GradientsParams::from_module(&mut grads, net))
        };
        let (out16, g16) = run(&load(true));
        let (out32, g32) = run(&load(false));
        let want = get(&cases, "denoise_out");
        let err16 = rel_l2(&out16.data, &want.data);
        eprintln!("{name}: bf16 body vs EDM float32: relative L2 {err16:.2e} (float32 body: {:.2e})", rel_l2(&out32.data, &want.data));
        // bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value).
        assert!(err16 < 2e-2, "{name}: bf16 body too far from EDM: {err16:.2e}");
        assert!(err16 > 1e-5, "{name}: bf16 body indistinguishable from float32 ({err16:.2e}): not running in bf16?");
        // Gradients of a few parameters, float32, within bf16 accuracy of the float32 ones.
        let keys: &[&str] = if name == "adm_tiny" {
            &["model.enc.16x16_conv.weight", "model.enc.8x8_block0.conv0.weight", "model.dec.16x16_block1.conv1.weight"]
        } else {
            &["model.enc.16x16_conv.weight", "model.enc.8x8_block0.conv0.weight", "model.dec.16x16_aux_conv.weight"]
        };
        for key in keys {
            let id = param_id("net", key);
            let (a, b) = (g16.get::<4>(id).unwrap_or_else(|| panic!("{key}: no bf16 gradient")), g32.get::<4>(id).expect("float32 gradient"));
            assert_eq!(a.dtype(), DType::F32, "{key}: gradient dtype");
            let e = rel_l2(&HostTensor::from_tensor(a).data, &HostTensor::from_tensor(b).data);
            eprintln!("{name} {key}: bf16 vs float32 gradient {e:.2e}");
            assert!(e < 5e-2, "{name} {key}: gradient {e:.2e}");
        }
    }
}
