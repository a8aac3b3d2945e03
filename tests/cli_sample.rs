//! `dmd sample` as a user calls it: reference samples through the command line on both CPU
//! backends, the output forms, one-step generation, and one-line errors on bad input.

mod common;

use common::*;
use dmd_models::{EdmPrecond, HostTensor, NamedTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().expect("run dmd")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "dmd failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Exits non-zero with one `error:` line naming `needle`, and no panic.
fn fails_naming(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error line should name `{n}`: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sample_command_reproduces_edm_heun_samples() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("cli_sample_ref");
    for name in ["adm_tiny", "ddpmpp_tiny"] {
        let cases = read(&dir.join(format!("{name}_cases.safetensors")));
        let mut lat = NamedTensors::default();
        lat.insert("latents", get(&cases, "sample_latents").clone());
        lat.insert("labels", get(&cases, "sample_labels").clone());
        let lat_path = tmp.join(format!("{name}_latents.safetensors"));
        lat.write(&lat_path).unwrap();
        for device in ["cpu", "ndarray"] {
            let out_path = tmp.join(format!("{name}_{device}.safetensors"));
            let teacher = dir.join(format!("{name}.safetensors"));
            // --teacher-config defaults to the same path with .json.
            ok(&dmd(&["sample", "--teacher", s(&teacher), "--latents", s(&lat_path), "--steps", "18", "--out", s(&out_path), "--device", device]));
            let images = read(&out_path);
            assert_close(&format!("dmd sample {name} [{device}]"), get(&images, "images"), get(&cases, "sample_out"), 1e-5);
        }
    }
}

#[test]
fn one_step_is_a_single_denoiser_call_at_sigma_max() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("cli_one_step");
    let cases = read(&dir.join("adm_tiny_cases.safetensors"));
    let latents = get(&cases, "sample_latents");
    let labels = get(&cases, "sample_labels");
    let mut lat = NamedTensors::default();
    lat.insert("latents", latents.clone());
    lat.insert("labels", labels.clone());
    let lat_path = tmp.join("latents.safetensors");
    lat.write(&lat_path).unwrap();
    let out_path = tmp.join("one_step.safetensors");
    let teacher = dir.join("adm_tiny.safetensors");
    ok(&dmd(&["sample", "--teacher", s(&teacher), "--latents", s(&lat_path), "--steps", "1", "--out", s(&out_path)]));

    // DMD's generator: D(80 z; sigma = 80), computed directly.
    let device = burn::tensor::Device::flex();
    let net = EdmPrecond::load(&teacher, &dir.join("adm_tiny.json"), &device, "t").unwrap();
    let n = latents.shape[0];
    let x = HostTensor::new(latents.shape.clone(), latents.data.iter().map(|v| v * 80.0).collect());
    let sigma = HostTensor::new(vec![n], vec![80.0; n]);
    let want = HostTensor::from_tensor(net.forward(x.to_tensor(&device), sigma.to_tensor(&device), Some(labels.to_tensor(&device))));
    assert_close("one-step sample vs D(80 z; 80)", get(&read(&out_path), "images"), &want, 1e-6);
}

#[test]
fn seeds_png_folder_and_grid() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("cli_png");
    let teacher = dir.join("ddpmpp_tiny.safetensors");
    let folder = tmp.join("pngs");
    ok(&dmd(&["sample", "--teacher", s(&teacher), "--seeds", "3-5,9", "--class", "2", "--steps", "4", "--out", s(&folder)]));
    let mut names: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["000003.png", "000004.png", "000005.png", "000009.png"]);
    let img = image::open(folder.join("000004.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));

    // The same seeds give the same images in a tensor file, whatever the batch size; the PNGs
    // are EDM's uint8 conversion of them.
    let st = tmp.join("seeds.safetensors");
    ok(&dmd(&["sample", "--teacher", s(&teacher), "--seeds", "3-5,9", "--class", "2", "--steps", "4", "--batch", "3", "--out", s(&st)]));
    let t = read(&st);
    let images = get(&t, "images");
    let labels = get(&t, "labels");
    assert_eq!(labels.shape, [4, 10]);
    assert!(labels.data.chunks(10).all(|l| l[2] == 1.0 && l.iter().sum::<f32>() == 1.0));
    let rgb = img.to_rgb8();
    let per = 3 * 16 * 16;
    let second = &images.data[per..2 * per];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            let want = (second[c * 256 + i] * 127.5 + 128.0).clamp(0.0, 255.0) as u8;
            assert_eq!(px[c], want, "pixel {i} channel {c}");
        }
    }
    let grid = tmp.join("grid.png");
    ok(&dmd(&["sample", "--teacher", s(&teacher), "--seeds", "0-5", "--steps", "2", "--out", s(&grid)]));
    let g = image::open(&grid).unwrap();
    assert_eq!((g.width(), g.height()), (48, 32)); // 3 x 2 tiles of 16x16
}

fn copy_case(dir: &Path, name: &str, tmp: &Path) -> (NamedTensors, PathBuf) {
    let t = read(&dir.join(format!("{name}.safetensors")));
    std::fs::copy(dir.join(format!("{name}.json")), tmp.join("net.json")).unwrap();
    (t, tmp.join("net.safetensors"))
}

#[test]
fn bad_checkpoints_and_inputs_give_one_line_errors() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("cli_errors");
    let (weights, path) = copy_case(&dir, "adm_tiny", &tmp);
    let args = |out: &str| vec!["sample".to_string(), "--teacher".into(), s(&path).into(), "--seeds".into(), "0-1".into(), "--steps".into(), "2".into(), "--out".into(), out.into()];
    let run = |out: &str| {
        let a = args(out);
        dmd(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out_file = tmp.join("o.safetensors");
    let out = s(&out_file);

    // A missing tensor.
    let mut w = weights.clone();
    w.tensors.remove("model.enc.8x8_block0.qkv.weight");
    w.write(&path).unwrap();
    fails_naming(&run(out), &["net.safetensors", "missing tensor `model.enc.8x8_block0.qkv.weight`", "[192, 64, 1, 1]"]);

    // A mis-shaped tensor: both shapes named.
    let mut w = weights.clone();
    w.insert("model.out_conv.weight", HostTensor::new(vec![3, 16, 3, 3], vec![0.0; 3 * 16 * 9]));
    w.write(&path).unwrap();
    fails_naming(&run(out), &["model.out_conv.weight", "[3, 16, 3, 3]", "[3, 32, 3, 3]"]);

    // An unexpected tensor.
    let mut w = weights.clone();
    w.insert("model.extra.weight", HostTensor::new(vec![2], vec![0.0; 2]));
    w.write(&path).unwrap();
    fails_naming(&run(out), &["unexpected tensor `model.extra.weight`"]);

    // A corrupt file.
    std::fs::write(&path, b"not a safetensors file").unwrap();
    fails_naming(&run(out), &["net.safetensors", "safetensors"]);

    // A malformed config.
    weights.write(&path).unwrap();
    std::fs::write(tmp.join("net.json"), r#"{"img_resolution": 16, "img_channels": 3, "model_type": "DhariwalUNet", "chanel_mult": [1, 2]}"#).unwrap();
    fails_naming(&run(out), &["net.json", "chanel_mult"]);

    // Latents of the wrong shape.
    std::fs::copy(dir.join("adm_tiny.json"), tmp.join("net.json")).unwrap();
    let mut lat = NamedTensors::default();
    lat.insert("latents", HostTensor::new(vec![2, 3, 8, 8], vec![0.0; 2 * 3 * 64]));
    let lat_path = tmp.join("lat.safetensors");
    lat.write(&lat_path).unwrap();
    let o = dmd(&["sample", "--teacher", s(&path), "--latents", s(&lat_path), "--steps", "2", "--out", out]);
    fails_naming(&o, &["lat.safetensors", "latents", "[2, 3, 8, 8]"]);

    // No checkpoint was written by any failed run.
    assert!(!out_file.exists());
}

#[test]
fn saved_networks_keep_edm_names_and_values() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("roundtrip");
    let device = burn::tensor::Device::flex();
    for name in ["adm_tiny", "ddpmpp_tiny"] {
        let original = read(&dir.join(format!("{name}.safetensors")));
        let net = EdmPrecond::load(&dir.join(format!("{name}.safetensors")), &dir.join(format!("{name}.json")), &device, "t").unwrap();
        let out = tmp.join(format!("{name}.safetensors"));
        net.save(&out).unwrap();
        let saved = read(&out);
        let keys = |t: &NamedTensors| t.tensors.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&saved), keys(&original), "{name}: the saved state_dict names differ from EDM's");
        for (k, v) in &original.tensors {
            assert_eq!(&saved.tensors[k], v, "{name}: {k} changed in the round trip");
        }
        // The saved config reloads to the same network.
        let again = EdmPrecond::load(&out, &tmp.join(format!("{name}.json")), &device, "t").unwrap();
        assert_eq!(again.config.resolved(), net.config.resolved());
    }
}

/// `dmd grid`: row k holds class k's samples for seeds seed + k * per_class + j, exactly the
/// images `dmd sample --class k --seeds ...` writes.
#[test]
fn grid_rows_are_per_class_samples() {
    let Some(dir) = reference_dir("edm") else { return };
    let tmp = scratch("cli_grid");
    let net = dir.join("adm_tiny.safetensors");
    let grid = tmp.join("grid.png");
    ok(&dmd(&["grid", "--teacher", net.to_str().unwrap(), "--classes", "2,5", "--per-class", "3", "--steps", "2", "--out", grid.to_str().unwrap()]));
    let img = image::open(&grid).unwrap().into_rgb8();
    assert_eq!((img.width(), img.height()), (3 * 16, 2 * 16));
    // Row 1 is class 5 with seeds 3, 4, 5.
    let folder = tmp.join("row1");
    ok(&dmd(&["sample", "--teacher", net.to_str().unwrap(), "--class", "5", "--seeds", "3-5", "--steps", "2", "--out", folder.to_str().unwrap()]));
    for (j, seed) in [3, 4, 5].iter().enumerate() {
        let one = image::open(folder.join(format!("{seed:06}.png"))).unwrap().into_rgb8();
        for y in 0..16 {
            for x in 0..16 {
                assert_eq!(one.get_pixel(x, y), img.get_pixel(j as u32 * 16 + x, 16 + y), "seed {seed} pixel ({x},{y})");
            }
        }
    }
}
