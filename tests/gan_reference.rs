//! DMD2's GAN term against the official code (`tests/data/dmd2_gan`, made with EDM's networks
//! and checked bit for bit against DMD2's `edm_guidance.py`): the fake score's bottleneck, the
//! head's logits, both losses and their gradients.

mod common;

use burn::tensor::Tensor;
use common::*;
use dmd_losses::gan::{discriminator_gan_loss, generator_gan_loss, realism_logits};
use burn::optim::GradientsParams;
use dmd_models::weights::{load_named, param_id};
use dmd_models::{EdmPrecond, GanHead, HostTensor};
use std::path::Path;

#[test]
fn gan_term_matches_dmd2() {
    let Some(edm) = reference_dir("edm") else { return };
    let Some(dmd) = reference_dir("dmd") else { return };
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dmd2_gan");
    let cases = read(&here.join("gan_cases.safetensors"));
    let head_weights = read(&here.join("head.safetensors"));
    let tol = 1e-5;
    for (backend, device) in cpu_backends() {
        let ad = device.clone().autodiff();
        let fake = EdmPrecond::load(&dmd.join("adm_tiny_fake.safetensors"), &edm.join("adm_tiny.json"), &ad, "fake").unwrap();
        assert_eq!(fake.bottleneck_shape(), (64, 8));
        let head = load_named(GanHead::placeholder(64, 8, &ad), &head_weights, "head.safetensors", "head").unwrap_or_else(|e| panic!("{e}"));
        let t = |k: &str| get(&cases, k).to_tensor::<4>(&ad);
        let s = |k: &str| get(&cases, k).to_tensor::<1>(&ad);
        let labels = || Some(get(&cases, "labels").to_tensor::<2>(&ad));
        let host1 = |x: Tensor<1>| HostTensor::from_tensor(x.inner());
        let logits_shape = |h: HostTensor| HostTensor::new(vec![h.shape[0], 1], h.data);

        // Bottleneck of the diffused fake image.
        let x_t = t("fake_image") + t("fake_noise") * s("fake_sigma").reshape([4, 1, 1, 1]);
        let rep = fake.bottleneck(x_t, s("fake_sigma"), labels());
        assert_close(&format!("fake_bottleneck [{backend}]"), &HostTensor::from_tensor(rep.inner()), get(&cases, "fake_bottleneck"), tol);

        // Generator loss; its gradient reaches the image through the fake network and head.
        let fake_image = t("fake_image").require_grad();
        let logits_fake = realism_logits(&fake, &head, fake_image.clone(), s("fake_sigma"), Some(t("fake_noise")), labels());
        assert_close(&format!("logits_fake [{backend}]"), &logits_shape(host1(logits_fake.clone())), get(&cases, "logits_fake"), 3e-5);
        let gen = generator_gan_loss(logits_fake);
        assert_close(&format!("gen_cls_loss [{backend}]"), &host1(gen.clone()), get(&cases, "gen_cls_loss"), tol);
        let g = fake_image.grad(&gen.backward()).expect("gradient with respect to the fake image");
        assert_close(&format!("d gen / d fake_image [{backend}]"), &HostTensor::from_tensor(g), get(&cases, "grad_fake_image_of_gen_loss"), tol);

        // Discriminator loss on detached images; gradients reach the head and the fake network.
        let logits_real = realism_logits(&fake, &head, t("real_image"), s("real_sigma"), Some(t("real_noise")), labels());
        assert_close(&format!("logits_real [{backend}]"), &logits_shape(host1(logits_real.clone())), get(&cases, "logits_real"), 3e-5);
        let logits_fake = realism_logits(&fake, &head, t("fake_image"), s("fake_sigma"), Some(t("fake_noise")), labels());
        let disc = discriminator_gan_loss(logits_real, logits_fake);
        assert_close(&format!("guidance_cls_loss [{backend}]"), &host1(disc.clone()), get(&cases, "guidance_cls_loss"), tol);
        let mut grads = disc.backward();
        let head_grads = GradientsParams::from_module(&mut grads, &head);
        let fake_grads = GradientsParams::from_module(&mut grads, &fake);
        // Parameter ids derive from (namespace, EDM name).
        let grad_of = |g: &GradientsParams, namespace: &str, key: &str| {
            HostTensor::from_tensor(g.get::<4>(param_id(namespace, key)).unwrap_or_else(|| panic!("no gradient for {key}")))
        };
        let gh = grad_of(&head_grads, "head", "cls_pred_branch.0.weight");
        assert_close(&format!("d disc / d head.0.weight [{backend}]"), &gh, get(&cases, "grad_head0_weight_of_guidance_loss"), tol);
        let gf = grad_of(&fake_grads, "fake", "model.enc.16x16_conv.weight");
        assert_close(&format!("d disc / d fake enc conv [{backend}]"), &gf, get(&cases, "grad_fake_enc_conv_weight_of_guidance_loss"), tol);
    }
}
