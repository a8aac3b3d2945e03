//! `dmd fid` end to end: reference statistics of a folder of PNGs equal the statistics of
//! pytorch-fid's features of the same images (float64, n - 1), `calc` of a set against its own
//! statistics is 0, `distance` reads EDM-layout files, and generated images go through.

mod common;

use common::*;
use dmd_experiments::fid::FidStats;
use std::process::{Command, Output};

fn dmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn fid_ref_calc_and_distance() {
    let (Some(eval), Some(edm)) = (reference_dir("eval"), reference_dir("edm")) else { return };
    let tmp = scratch("cli_fid");
    let w = eval.join("inception_fid_random.safetensors");
    let (w, images) = (w.to_str().unwrap(), eval.join("images64"));
    let out = tmp.join("ref.npz");
    let common = ["--inception", w, "--mode", "pytorch-fid", "--batch", "3"];
    ok(&dmd(&[&["fid", "ref", "--images", images.to_str().unwrap(), "--out", out.to_str().unwrap()], &common[..]].concat()));

    // mu and sigma (n - 1) of pytorch-fid's own features of these 8 images, in float64.
    let cases = read(&eval.join("inception_cases.safetensors"));
    let f = get(&cases, "features");
    let (n, d) = (f.shape[0], f.shape[1]);
    let x = |i: usize, j: usize| f.data[i * d + j] as f64;
    let mu: Vec<f64> = (0..d).map(|j| (0..n).map(|i| x(i, j)).sum::<f64>() / n as f64).collect();
    let stats = FidStats::read_npz(&out).unwrap();
    let err_mu = mu.iter().zip(&stats.mu).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / mu.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!(err_mu < 1e-4, "mu: {err_mu:.2e}");
    for (j, k) in [(0, 0), (5, 17), (100, 2000), (2047, 2047)] {
        let s: f64 = (0..n).map(|i| (x(i, j) - mu[j]) * (x(i, k) - mu[k])).sum::<f64>() / (n - 1) as f64;
        let got = stats.sigma[j * d + k];
        assert!((got - s).abs() <= 1e-3 * s.abs().max(1e-3), "sigma[{j},{k}] = {got}, want {s}");
    }

    // The same images against their own statistics: 0, to rounding. With 8 images sigma has
    // rank 7 of 2048, and the square root turns rounding noise in its null space (~1e-10) into
    // ~1e-5 per eigenvalue: tolerance 1e-5 of the traces (measured: -0.022 with 2 tr = 2.9e4).
    let scale = 2.0 * (0..d).map(|i| stats.sigma[i * d + i]).sum::<f64>();
    let fid = ok(&dmd(&[&["fid", "calc", "--images", images.to_str().unwrap(), "--ref", out.to_str().unwrap()], &common[..]].concat()));
    eprintln!("self-FID {} (traces {scale})", fid.trim());
    assert!(fid.trim().parse::<f64>().unwrap().abs() < 1e-5 * scale, "{fid} (traces {scale})");
    let dist = ok(&dmd(&["fid", "distance", out.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(dist.trim().parse::<f64>().unwrap().abs() < 1e-5 * scale, "{dist}");

    // Generated images (the EDM teacher, 2 Heun steps) go through the same path, with a JSON.
    let json = tmp.join("fid.json");
    let teacher = edm.join("adm_tiny.safetensors");
    ok(&dmd(&[&["fid", "calc", "--teacher", teacher.to_str().unwrap(), "--steps", "2", "--num", "4", "--ref", out.to_str().unwrap(), "--json", json.to_str().unwrap()], &common[..]].concat()));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["num_images"], 4);
    assert!(v["fid"].as_f64().unwrap() > 1.0);

    // A statistics file with a wrong shape is one line naming it.
    let bad = tmp.join("bad.npz");
    FidStats { mu: vec![0.0; 3], sigma: vec![0.0; 4] }.write_npz(&bad).unwrap();
    let o = dmd(&["fid", "distance", bad.to_str().unwrap(), out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.npz") && err.lines().count() == 1, "{err}");
}
