//! Sharded jobs: `dmd make-pairs --shard I/N` and `dmd sample --shard I/N` split over N
//! processes leave exactly the files (byte for byte) of one unsharded run; a rerun skips what
//! is there; malformed `--shard` values are one-line errors naming the flag.

mod common;

use burn::tensor::Device;
use common::*;
use dmd_models::{EdmConfig, EdmPrecond};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd")).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A random conditional 8x8 RGB EDM network (weights + config).
fn tiny_net(path: &Path) -> EdmPrecond {
    let cfg = EdmConfig::from_json_str(
        r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 4, "model_type": "DhariwalUNet",
            "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}"#,
    )
    .unwrap();
    let net = EdmPrecond::new(&cfg, &Device::flex(), 11);
    net.save(path).unwrap();
    net
}

/// Every file under `dir` (relative name -> bytes).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert!(p.is_file(), "{}: unexpected folder", p.display());
        out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
    }
    out
}

fn assert_same_files(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>(), "file lists of {} and {}", a.display(), b.display());
    for (name, bytes) in &fa {
        assert!(bytes == &fb[name], "{}: differs between {} and {}", name.display(), a.display(), b.display());
    }
}

#[test]
fn sharded_pairs_and_samples_equal_unsharded_runs() {
    let t0 = std::time::Instant::now();
    let tmp = scratch("sharding");
    let teacher = tmp.join("teacher.safetensors");
    let net = tiny_net(&teacher);

    // make-pairs: 10 pairs in 4 shard files (3, 3, 3, 1), batches of 2 inside each.
    let pairs_args = |out: &Path, shard: Option<&str>| {
        let mut a: Vec<String> = ["make-pairs", "--teacher", s(&teacher), "--num", "10", "--steps", "3", "--shard-size", "3", "--batch", "2", "--out", s(out)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        if let Some(sh) = shard {
            a.extend(["--shard".to_string(), sh.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| ok(&dmd(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let whole = tmp.join("pairs-whole");
    let split = tmp.join("pairs-split");
    run(pairs_args(&whole, None));
    // Shard 1/2 first: it writes shard files 1 and 3 only (and the manifest).
    let msg = run(pairs_args(&split, Some("1/2")));
    assert!(msg.contains("shard 1/2"), "{msg}");
    let names: Vec<String> = files(&split).keys().map(|p| p.display().to_string()).collect();
    assert_eq!(names, ["pairs-000001.safetensors", "pairs-000003.safetensors", "pairs.json"]);
    run(pairs_args(&split, Some("0/2")));
    assert_same_files(&whole, &split);
    // Resume: a rerun of a shard skips its files; a missing one is made again, identically.
    std::fs::remove_file(split.join("pairs-000002.safetensors")).unwrap();
    let before = std::fs::metadata(split.join("pairs-000000.safetensors")).unwrap().modified().unwrap();
    run(pairs_args(&split, Some("0/2")));
    assert_eq!(std::fs::metadata(split.join("pairs-000000.safetensors")).unwrap().modified().unwrap(), before);
    run(pairs_args(&split, Some("1/2"))); // nothing to do
    assert_same_files(&whole, &split);
    eprintln!("make-pairs: 2 shards == unsharded ({:.1}s)", t0.elapsed().as_secs_f64());

    // A two-step generator (noise levels in its metadata): the second step adds noise drawn
    // from each image's seed.
    let generator = tmp.join("generator.safetensors");
    net.save_with_metadata(&generator, &[("dmd_generator_sigmas", "[80.0, 2.5]".to_string())]).unwrap();
    let sample_args = |out: &Path, shard: Option<&str>| {
        let mut a: Vec<String> = ["sample", "--generator", s(&generator), "--seeds", "3-12", "--batch", "3", "--out", s(out)].iter().map(|x| x.to_string()).collect();
        if let Some(sh) = shard {
            a.extend(["--shard".to_string(), sh.to_string()]);
        }
        a
    };
    let whole = tmp.join("gen-whole");
    let split = tmp.join("gen-split");
    run(sample_args(&whole, None));
    assert_eq!(files(&whole).len(), 10);
    assert!(whole.join("000003.png").is_file() && whole.join("000012.png").is_file());
    // 10 seeds in batches of 3: shard 0 does batches 0 and 3 (seeds 3-5, 12), 1 seeds 6-8, 2 seeds 9-11.
    run(sample_args(&split, Some("2/3")));
    let names: Vec<String> = files(&split).keys().map(|p| p.display().to_string()).collect();
    assert_eq!(names, ["000009.png", "000010.png", "000011.png"]);
    run(sample_args(&split, Some("0/3")));
    run(sample_args(&split, Some("1/3")));
    assert_same_files(&whole, &split);
    // The teacher's Heun sampler shards the same way.
    let (tw, ts) = (tmp.join("teacher-whole"), tmp.join("teacher-split"));
    let targs = |out: &Path| ["sample", "--teacher", s(&teacher), "--seeds", "0-6", "--steps", "3", "--batch", "2", "--out", s(out)].map(String::from).to_vec();
    run(targs(&tw));
    for sh in ["0/3", "1/3", "2/3"] {
        let mut a = targs(&ts);
        a.extend(["--shard".into(), sh.into()]);
        run(a);
    }
    assert_same_files(&tw, &ts);
    eprintln!("sample: 3 shards == unsharded ({:.1}s)", t0.elapsed().as_secs_f64());

    // Each image depends on its seed only, not on the batch it was drawn in (flex backend).
    let (a, b) = (tmp.join("batch1.safetensors"), tmp.join("batch10.safetensors"));
    for (out, batch) in [(&a, "1"), (&b, "10")] {
        ok(&dmd(&["sample", "--generator", s(&generator), "--seeds", "3-12", "--batch", batch, "--out", s(out)]));
    }
    assert_eq!(read(&a).tensors, read(&b).tensors, "generator images depend on the batch composition");
    let c = tmp.join("seeds-7-9.safetensors");
    ok(&dmd(&["sample", "--generator", s(&generator), "--seeds", "7-9", "--out", s(&c)]));
    let all = get(&read(&b), "images").clone();
    let per = 3 * 8 * 8;
    assert_eq!(get(&read(&c), "images").data, all.data[4 * per..7 * per].to_vec(), "seeds 7-9 alone vs within 3-12");

    // Malformed --shard: one line, naming the flag, nothing written.
    for bad in ["3/2", "2/2", "0/0", "x", "1", "-1/2", "1/x", "0/2/3"] {
        let out = tmp.join(format!("bad-{}", bad.replace('/', "_")));
        for args in [pairs_args(&out, Some(bad)), sample_args(&out, Some(bad))] {
            let o = dmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "--shard {bad} accepted");
            assert_eq!(err.lines().count(), 1, "--shard {bad}: {err}");
            assert!(err.starts_with("error: --shard"), "--shard {bad}: {err}");
            assert!(!out.exists(), "--shard {bad}: wrote {}", out.display());
        }
    }
    // A sharded sample needs a folder.
    let o = dmd(&sample_args(&tmp.join("x.safetensors"), Some("0/2")).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--shard"));
    eprintln!("sharding test: {:.1}s", t0.elapsed().as_secs_f64());
}
