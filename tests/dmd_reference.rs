//! DMD's losses against the official DMD2 computation (`../shared/reference/dmd`): the noise
//! grid, both score predictions, the normalised gradient, the distribution-matching loss and
//! its gradient with respect to the generator output, and the fake-score loss.

mod common;

use burn::tensor::Tensor;
use common::*;
use dmd_losses::dmd::{distribution_matching_loss, fake_score_loss, NoiseGrid};
use dmd_models::{EdmPrecond, HostTensor};

#[test]
fn dmd_losses_match_dmd2() {
    let (Some(edm), Some(dir)) = (reference_dir("edm"), reference_dir("dmd")) else { return };
    let cases = read(&dir.join("dmd_cases.safetensors"));
    let grid = NoiseGrid::default();
    let sigmas = grid.sigmas();
    assert!(rel_l2(&sigmas, &get(&cases, "karras_sigmas").data) < 1e-6, "Karras grid");
    assert_eq!(grid.dm_range(), (20, 981));

    let config = edm.join("adm_tiny.json");
    for (backend, device) in cpu_backends() {
        let real = EdmPrecond::load(&edm.join("adm_tiny.safetensors"), &config, &device, "real").unwrap();
        let fake = EdmPrecond::load(&dir.join("adm_tiny_fake.safetensors"), &config, &device, "fake").unwrap();
        let ad = device.clone().autodiff();
        let labels = get(&cases, "labels").to_tensor::<2>(&device);
        let pick = |key: &str| {
            let idx = get(&cases, key);
            let s: Vec<f32> = idx.data.iter().map(|&i| sigmas[i as usize]).collect();
            HostTensor::new(vec![s.len()], s)
        };

        // Distribution matching, with the generator output on the autodiff device.
        let dm_sigma = pick("dm_sigma_index");
        assert_close(&format!("dm sigmas [{backend}]"), &dm_sigma, get(&cases, "dm_sigma"), 1e-6);
        let x = get(&cases, "x").to_tensor::<4>(&ad).require_grad();
        let score = |net: &EdmPrecond| {
            let labels = labels.clone();
            let net = net.clone();
            move |x_t: Tensor<4>, s: Tensor<1>| Tensor::from_inner(net.forward(x_t.inner(), s.inner(), Some(labels.clone())))
        };
        // The drawn sigmas are inputs of the case; the grid is checked above.
        let dm = distribution_matching_loss(x.clone(), get(&cases, "dm_sigma").to_tensor(&ad), get(&cases, "dm_noise").to_tensor(&ad), score(&real), score(&fake));
        let host = |t: Tensor<4>| HostTensor::from_tensor(t.inner());
        assert_close(&format!("pred_real [{backend}]"), &host(dm.pred_real), get(&cases, "pred_real"), 1e-5);
        assert_close(&format!("pred_fake [{backend}]"), &host(dm.pred_fake), get(&cases, "pred_fake"), 1e-5);
        assert_close(&format!("dm_weight [{backend}]"), &HostTensor::from_tensor(dm.weight.inner()), get(&cases, "dm_weight"), 1e-5);
        // (p_real - p_fake) is a small difference of two nearly equal predictions (the fake net
        // is a perturbed copy of the real one), so float32 rounding is amplified: the reference's
        // own dm_grad lies 2.8e-5 (relative L2; 5.3e-5 for the sigma = 0.003 sample) from the same
        // computation in float64 with the official networks (measured 2026-11-25). A float32 port
        // cannot be held closer than that; 5e-5 still fails on any error in the formula.
        assert_close(&format!("dm_grad [{backend}]"), &host(dm.grad), get(&cases, "dm_grad"), 5e-5);
        assert_close(&format!("dm_loss [{backend}]"), &HostTensor::from_tensor(dm.loss.clone().inner()), get(&cases, "dm_loss"), 1e-5);
        let grads = dm.loss.backward();
        let gx = x.grad(&grads).expect("gradient with respect to x");
        assert_close(&format!("dm_loss_grad_x [{backend}]"), &HostTensor::from_tensor(gx), get(&cases, "dm_loss_grad_x"), 5e-5);

        // Fake-score loss.
        let fake_sigma = pick("fake_sigma_index");
        assert_close(&format!("fake sigmas [{backend}]"), &fake_sigma, get(&cases, "fake_sigma"), 1e-6);
        let (loss, pred) = fake_score_loss(
            get(&cases, "x").to_tensor(&device),
            get(&cases, "fake_sigma").to_tensor(&device),
            get(&cases, "fake_noise").to_tensor(&device),
            0.5,
            |x_t, s| fake.forward(x_t, s, Some(labels.clone())),
        );
        assert_close(&format!("fake_pred [{backend}]"), &HostTensor::from_tensor(pred), get(&cases, "fake_pred"), 1e-5);
        assert_close(&format!("fake_loss [{backend}]"), &HostTensor::from_tensor(loss), get(&cases, "fake_loss"), 1e-5);
    }
}
