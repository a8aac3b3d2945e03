//! Shared helpers of the integration tests.
#![allow(dead_code)]

use burn::tensor::Device;
use dmd_models::{HostTensor, NamedTensors};
use std::path::{Path, PathBuf};

/// The reference cases computed with the official code: `$DMD_REFERENCE_DIR`, default
/// `../shared/reference`. `None` (and a loud note) when absent: the test is skipped.
pub fn reference_dir(sub: &str) -> Option<PathBuf> {
    let root = std::env::var_os("DMD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"));
    let dir = root.join(sub);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: reference folder {} not found (set DMD_REFERENCE_DIR)", dir.display());
        None
    }
}

/// The CPU backends every reference test runs on.
pub fn cpu_backends() -> Vec<(&'static str, Device)> {
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    vec![("flex", Device::flex()), ("ndarray", ndarray)]
}

pub fn read(path: &Path) -> NamedTensors {
    NamedTensors::read(path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn get<'a>(t: &'a NamedTensors, key: &str) -> &'a HostTensor {
    t.get(key).unwrap_or_else(|| panic!("reference tensor `{key}` missing"))
}

/// ||a - b|| / ||b||, in float64 (0 when both are zero, infinite when only `b` is).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    match (num, den) {
        (0.0, _) => 0.0,
        (_, 0.0) => f64::INFINITY,
        _ => (num / den).sqrt(),
    }
}

pub fn assert_close(what: &str, got: &HostTensor, want: &HostTensor, tol: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = rel_l2(&got.data, &want.data);
    eprintln!("{what}: relative L2 error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative L2 error {err:.3e} exceeds {tol:.0e}");
}

/// A scratch folder under the target directory, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every tensor of the safetensors file `got` within relative L2 error `tol` of `want`'s
/// (same names); returns the largest error.
pub fn assert_files_close(what: &str, got: &Path, want: &Path, tol: f64) -> f64 {
    let (g, w) = (read(got), read(want));
    assert_eq!(g.tensors.keys().collect::<Vec<_>>(), w.tensors.keys().collect::<Vec<_>>(), "{what}: tensor names");
    let mut worst = 0.0f64;
    for (name, t) in &w.tensors {
        assert_eq!(g.tensors[name].shape, t.shape, "{what}: {name} shape");
        let err = rel_l2(&g.tensors[name].data, &t.data);
        assert!(err <= tol, "{what}: {name} relative L2 error {err:.3e} exceeds {tol:.0e}");
        worst = worst.max(err);
    }
    eprintln!("{what}: largest relative L2 error {worst:.3e} (tolerance {tol:.0e})");
    worst
}

/// The relative L2 error of all tensors of `got` together against `want`'s (same names).
pub fn files_rel_l2(got: &Path, want: &Path) -> f64 {
    let (g, w) = (read(got), read(want));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (name, t) in &w.tensors {
        let a = &g.tensors.get(name).unwrap_or_else(|| panic!("{}: {name} missing", got.display())).data;
        assert_eq!(a.len(), t.data.len(), "{name}: size");
        num += a.iter().zip(&t.data).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>();
        den += t.data.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
    }
    (num / den).sqrt()
}
