//! Malformed inputs, one of each kind of fault (configs, weights and checkpoints, datasets,
//! latents, network configs, FID statistics, teacher pairs; Stable Diffusion folders,
//! text-to-image configs, prompt files and `dmd txt2img` options): `dmd` must refuse every one
//! with a single `error:` line that names the file and the key, tensor or record at fault,
//! without a panic, and without writing anything. The corpus and what each case must say are in
//! tests/data/malformed/ (`cases.toml` describes the format).

mod common;

use common::scratch;
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/malformed")
}

struct Case {
    name: String,
    args: Vec<String>,
    needles: Vec<String>,
    /// Paths (relative to the corpus copy, or with `{out}`) that must not exist afterwards.
    absent: Vec<String>,
    /// Files of the corpus copy that must still equal the committed ones.
    unchanged: Vec<String>,
}

fn strings(case: &toml::Table, key: &str, default: &[&str]) -> Vec<String> {
    match case.get(key) {
        None => default.iter().map(|s| s.to_string()).collect(),
        Some(v) => v
            .as_array()
            .unwrap_or_else(|| panic!("cases.toml: `{key}` must be a list"))
            .iter()
            .map(|s| s.as_str().unwrap_or_else(|| panic!("cases.toml: `{key}` must list strings")).to_string())
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus().join("cases.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let list = table["case"].as_array().expect("[[case]] entries");
    list.iter()
        .map(|c| {
            let c = c.as_table().expect("a [[case]] table");
            for key in c.keys() {
                assert!(["name", "args", "needles", "absent", "unchanged"].contains(&key.as_str()), "cases.toml: unknown key `{key}`");
            }
            Case {
                name: c["name"].as_str().expect("name").to_string(),
                args: strings(c, "args", &[]),
                needles: strings(c, "needles", &[]),
                absent: strings(c, "absent", &["{out}"]),
                unchanged: strings(c, "unchanged", &[]),
            }
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// GPT-2's byte -> printable character table: how CLIP's vocabulary spells single bytes.
fn byte_symbols() -> Vec<String> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `sd/` of the corpus (not committed: the weights come from this port's own constructors):
/// `ok/`, a tiny random Stable Diffusion in the diffusers layout (a CLIP tokenizer of the 512
/// byte symbols and four merges; a text encoder of width 8; a UNet of channels (8, 8); a VAE
/// of one block), and copies of it with one thing broken, each named for it. Deterministic.
fn write_sd_folders(sd: &Path) {
    use burn::tensor::Device;
    use dmd_models::nn::Init;
    use dmd_models::sd::clip::{ClipTextConfig, ClipTextModel};
    use dmd_models::sd::unet::{UNet2DCondition, UNetConfig, WEIGHTS_FILE};
    use dmd_models::sd::vae::{AutoencoderKL, VaeConfig};
    use dmd_models::weights::named_tensors;
    let device = Device::flex();
    let ok = sd.join("ok");

    let syms = byte_symbols();
    let mut vocab: Vec<String> = syms.iter().cloned().chain(syms.iter().map(|s| format!("{s}</w>"))).collect();
    let merges = ["t h", "th e</w>", "r e", "re d</w>"];
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let vocab: serde_json::Map<String, serde_json::Value> = vocab.into_iter().enumerate().map(|(i, t)| (t, serde_json::Value::from(i))).collect();
    write(&ok.join("tokenizer/vocab.json"), serde_json::to_string(&vocab).unwrap());
    write(&ok.join("tokenizer/merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n")));

    let clip_json = r#"{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77}"#;
    write(&ok.join("text_encoder/config.json"), clip_json);
    let clip = ClipTextModel::new(&ClipTextConfig::from_json_file(&ok.join("text_encoder/config.json")).unwrap(), &mut Init::new(&device, 1));
    named_tensors(&clip).write(&ok.join("text_encoder/model.safetensors")).unwrap();

    let unet_json = r#"{"_class_name": "UNet2DConditionModel", "sample_size": 4, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 2}"#;
    let unet = UNet2DCondition::new(&UNetConfig::from_json_str(unet_json).unwrap(), &mut Init::new(&device, 2));
    std::fs::create_dir_all(ok.join("unet")).unwrap();
    unet.save(&ok.join("unet")).unwrap();

    let vae_json = r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8], "norm_num_groups": 4, "latent_channels": 4, "layers_per_block": 1}"#;
    write(&ok.join("vae/config.json"), vae_json);
    let vae = AutoencoderKL::new(&VaeConfig::from_json_str(vae_json).unwrap(), &mut Init::new(&device, 3));
    named_tensors(&vae).write(&ok.join("vae").join(AutoencoderKL::WEIGHTS_FILE)).unwrap();

    let broken = |name: &str, file: &str, bytes: Vec<u8>| {
        copy_dir(&ok, &sd.join(name));
        write(&sd.join(name).join(file), bytes);
    };
    broken("vocab_not_json", "tokenizer/vocab.json", b"<|startoftext|> 49406\n<|endoftext|> 49407\n".to_vec());
    let mut far = vocab.clone();
    far.insert("x</w>".into(), serde_json::Value::from(100_000));
    broken("vocab_id_range", "tokenizer/vocab.json", serde_json::to_vec(&far).unwrap());
    broken("merges_bad_line", "tokenizer/merges.txt", b"#version: 0.2\nt h\nth e </w>\nr e\n".to_vec());
    let unet_cfg = std::fs::read_to_string(ok.join("unet/config.json")).unwrap();
    broken("unet_block_type", "unet/config.json", unet_cfg.replacen("\"CrossAttnDownBlock2D\"", "\"AttnDownBlock2D\"", 1).into_bytes());
    let mut tensors = named_tensors(&unet);
    tensors.tensors.remove("mid_block.attentions.0.proj_out.weight").expect("the UNet has the tensor");
    let path = sd.join("unet_missing_tensor/unet").join(WEIGHTS_FILE);
    copy_dir(&ok, &sd.join("unet_missing_tensor"));
    tensors.write(&path).unwrap();
    // A generator folder as `dmd distill` writes one, less its config.json.
    write(&sd.join("generator_no_config").join(WEIGHTS_FILE), std::fs::read(ok.join("unet").join(WEIGHTS_FILE)).unwrap());
    write(&sd.join("generator_no_config/dmd_generator.json"), r#"{"timestep": 999}"#);
    // A generator whose timestep lies past the teacher's 1000.
    copy_dir(&ok.join("unet"), &sd.join("generator_timestep"));
    write(&sd.join("generator_timestep/dmd_generator.json"), r#"{"timestep": 5000}"#);
}

/// What is wrong with how `dmd` handled the case (empty: all good).
fn check(case: &Case, copy: &Path, out: &Path) -> Vec<String> {
    let sub = |s: &str| s.replace("{out}", out.to_str().unwrap());
    let args: Vec<String> = case.args.iter().map(|a| sub(a)).collect();
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(&args).current_dir(copy).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let mut problems = Vec::new();
    if o.status.success() {
        problems.push("exited with status 0".to_string());
    }
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 {
        problems.push(format!("{} lines on stderr instead of one", lines.len()));
    }
    if !err.starts_with("error: ") {
        problems.push("stderr does not start with `error: `".into());
    }
    for bad in ["internal error", "panicked"] {
        if err.contains(bad) {
            problems.push(format!("a panic (`{bad}`)"));
        }
    }
    for n in &case.needles {
        if !err.contains(n.as_str()) {
            problems.push(format!("does not say `{n}`"));
        }
    }
    for a in &case.absent {
        let p = copy.join(sub(a)); // an absolute path replaces the base
        if p.exists() {
            problems.push(format!("wrote {}", p.display()));
        }
    }
    for u in &case.unchanged {
        if std::fs::read(copy.join(u)).ok() != std::fs::read(corpus().join(u)).ok() {
            problems.push(format!("changed {u}"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!("\n    command: dmd {}\n    stderr: {}", args.join(" "), err.trim_end().replace('\n', "\n            ")));
    }
    problems
}

#[test]
fn malformed_inputs_give_one_line_errors_naming_file_and_key_and_write_nothing() {
    let cases = cases();
    assert!(cases.len() >= 74, "the corpus has {} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be distinct");
    for c in &cases {
        assert!(!c.args.is_empty() && !c.needles.is_empty(), "{}: needs args and needles", c.name);
    }

    // The commands run in a copy: a resumed run may rewrite its folder, and nothing may touch
    // the committed corpus.
    let tmp = scratch("malformed_inputs");
    let copy = tmp.join("corpus");
    copy_dir(&corpus(), &copy);
    write_sd_folders(&copy.join("sd"));
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let problems = check(c, &copy, &tmp.join("out").join(&c.name));
            (!problems.is_empty()).then(|| format!("{}: {}", c.name, problems.join("; ")))
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} malformed inputs were not refused as they should be:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
