//! `dmd bench`'s JSON contract (numbers are measured, never asserted beyond being times):
//! `dmd bench --net-config NET.json --batch B --device D --json OUT.json` writes
//! `denoise_fwd_ms`, `teacher_step_ms`, `dmd_step_ms` and the generation times per NFE.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn bench_writes_the_json_contract() {
    let tmp = scratch("bench_cli");
    let net = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs/networks/adm_tiny.json");
    let out = tmp.join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["bench", "--net-config", net.to_str().unwrap(), "--batch", "2", "--device", "cpu", "--warmup", "0", "--iters", "1", "--train-iters", "1", "--sampling", "1,3"])
        .args(["--replicas", "2"])
        .args(["--json", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for key in ["denoise_fwd_ms", "teacher_step_ms", "dmd_step_ms"] {
        assert!(v[key].as_f64().is_some_and(|t| t > 0.0 && t.is_finite()), "{key}: {}", v[key]);
    }
    // The teacher step's timed parts.
    for key in ["teacher_step_forward_backward_ms", "teacher_step_forward_ms", "teacher_step_backward_ms", "teacher_step_update_ms"] {
        assert!(v[key].as_f64().is_some_and(|t| t > 0.0 && t.is_finite()), "{key}: {}", v[key]);
    }
    assert_eq!(v["batch"], 2);
    assert_eq!(v["dmd_step_replicas"], 2);
    assert_eq!(v["backend"], "cpu");
    let gen = &v["generation_ms_per_batch_by_nfe"];
    assert!(gen["1"].as_f64().unwrap() > 0.0 && gen["3"].as_f64().unwrap() > 0.0, "{gen}");
    // Heun with an even NFE does not exist: a one-line error.
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(["bench", "--batch", "1", "--device", "cpu", "--no-train", "--iters", "1", "--sampling", "4"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("odd"));
}

/// `--check-reference` recomputes the official EDM outputs on each backend (the errors must be
/// those of a correct float32 port), and `--ops` times every building block.
#[test]
fn bench_checks_the_reference_and_times_building_blocks() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("bench_cli_ops");
    let out = tmp.join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["bench", "--batch", "2", "--device", "cpu", "--no-train", "--warmup", "0", "--iters", "1", "--sampling", "1", "--ops"])
        .args(["--check-reference", dir.to_str().unwrap(), "--json", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let errors = v["reference_rel_l2"]["cpu"].as_object().expect("reference errors");
    for case in ["adm_tiny.denoise_out", "adm_tiny.sample_out", "ddpmpp_tiny.denoise_out", "ddpmpp_tiny.sample_out"] {
        let e = errors[case].as_f64().unwrap_or(f64::NAN);
        assert!(e < 1e-5, "{case}: relative L2 error {e}");
    }
    let ops = v["backends"]["cpu"]["ops"].as_object().expect("ops");
    // 11 blocks of adm_tiny, plus a 3x3 convolution with bias and input convolutions of 1, 4 and 8 channels.
    assert_eq!(ops.len(), 15, "{ops:?}");
    for (name, t) in ops {
        for key in ["forward_ms", "forward_backward_ms"] {
            assert!(t[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{name} {key}: {t}");
        }
    }
    assert!(v["parameters"].as_u64().is_some_and(|p| p > 0));
}

/// `--ops --bf16` runs the building blocks in float32 and in bf16 and reports their errors
/// against float32 on the CPU. Here the device is the CPU: float32 is the same computation
/// (error 0), and each bf16 error must be that of bf16 rounding (unit roundoff 2^-9 ~ 2e-3 per
/// value), neither ~1e-7 (the block silently ran in float32) nor of order one (a wrong kernel).
#[test]
fn bench_reports_building_block_errors_in_bf16() {
    let tmp = scratch("bench_cli_bf16_ops");
    let out = tmp.join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["bench", "--batch", "2", "--device", "cpu", "--no-train", "--warmup", "0", "--iters", "1", "--sampling", "1", "--ops", "--bf16"])
        .args(["--json", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ops = v["backends"]["cpu"]["ops"].as_object().expect("ops");
    // 11 blocks of adm_tiny, plus a 3x3 convolution with bias and input convolutions of 1, 4 and 8 channels.
    assert_eq!(ops.len(), 15, "{ops:?}");
    for (name, t) in ops {
        let convolution = name.starts_with("conv");
        for (precision, band) in [("f32", 0.0..1e-12), ("bf16", 3e-4..2e-2)] {
            let e = &t["rel_l2_vs_cpu_f32"][precision];
            for (key, present) in [("output", true), ("input_grad", true), ("weight_grad", convolution)] {
                match e[key].as_f64() {
                    Some(err) => assert!(present && (band.contains(&err) || (band.start == 0.0 && err == 0.0)), "{name} {precision} {key}: error {err:.2e}"),
                    None => assert!(!present, "{name}: no {precision} {key} error: {e}"),
                }
            }
        }
    }
}
