//! Stable Diffusion v1.5's text side against transformers (`../shared/reference/sd`): the CLIP
//! tokenizer on the real vocabulary, the CLIP text encoder on a tiny random checkpoint, and
//! one-line errors for broken files.


use burn::tensor::{Int, Tensor, TensorData};
use dmd_models::nn::Init;
use dmd_models::sd::clip::{ids_tensor, ClipTextConfig, ClipTextModel};
use dmd_models::sd::tokenizer::{ClipTokenizer, MAX_LENGTH};
use dmd_models::weights::named_shapes;
use dmd_models::{HostTensor, NamedTensors};
use std::path::Path;

/// An int64 tensor of a safetensors file, with its shape (HostTensor is float32 only).
fn read_i64(path: &Path, key: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "{key}: dtype");
    let data = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    (view.shape().to_vec(), data)
}

fn int_tensor(shape: &[usize], data: &[i64], device: &burn::tensor::Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(data.to_vec(), [shape[0], shape[1]]), device)
}

#[test]
fn tokenizer_matches_clip_tokenizer() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let tok = ClipTokenizer::load(&dir.join("tokenizer")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!((tok.start_id(), tok.end_id()), (49406, 49407));
    let prompts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_prompts.json")).unwrap()).unwrap();
    let (shape, want) = read_i64(&dir.join("tokenizer_cases.safetensors"), "input_ids");
    assert_eq!(shape, vec![prompts.len(), MAX_LENGTH]);
    let batch = tok.encode_batch(&prompts);
    for (i, prompt) in prompts.iter().enumerate() {
        let got: Vec<i64> = tok.encode(prompt).iter().map(|&v| i64::from(v)).collect();
        let want = &want[i * MAX_LENGTH..(i + 1) * MAX_LENGTH];
        assert_eq!(got, want, "prompt {i} {prompt:?}");
        assert_eq!(batch[i].iter().map(|&v| i64::from(v)).collect::<Vec<_>>(), want, "encode_batch, prompt {i}");
    }
    // Decomposed accents (NFD, as macOS often writes them) tokenize as the composed ones.
    assert_eq!(tok.encode("cafe\u{301} de\u{301}ja\u{300} vu"), tok.encode("café déjà vu"));
    // Case and whitespace do not matter.
    assert_eq!(tok.encode("  A PHOTO\tof a\n cat "), tok.encode("a photo of a cat"));
}

#[test]
fn tokenizer_errors_name_the_file() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let src = dir.join("tokenizer");
    let tmp = crate::common::scratch("sd_text_tokenizer_errors");
    std::fs::copy(src.join("vocab.json"), tmp.join("vocab.json")).unwrap();
    let err = ClipTokenizer::load(&tmp).unwrap_err().to_string();
    assert!(err.contains("merges.txt") && !err.contains('\n'), "{err}");

    std::fs::write(tmp.join("merges.txt"), "#version: 0.2\ni n\nt h\nthis line is bad\n").unwrap();
    let err = ClipTokenizer::load(&tmp).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("merges.txt") && err.contains("line 4"), "{err}");

    std::fs::write(tmp.join("vocab.json"), "{\"a\": 1,").unwrap();
    let err = ClipTokenizer::load(&tmp).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("vocab.json") && !err.contains('\n'), "{err}");
}

#[test]
fn text_encoder_matches_transformers() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let cases = dir.join("sd_cases.safetensors");
    let want = crate::common::read(&cases);
    for (name, device) in crate::common::cpu_backends() {
        let model = ClipTextModel::load(&dir.join("text_encoder"), &device).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(model.hidden_size(), 32);
        for (ids_key, out_key) in [("input_ids", "text_embeddings"), ("uncond_input_ids", "uncond_embeddings")] {
            let (shape, ids) = read_i64(&cases, ids_key);
            let got = HostTensor::from_tensor(model.forward(int_tensor(&shape, &ids, &device)));
            crate::common::assert_close(&format!("{name} {out_key}"), &got, crate::common::get(&want, out_key), 1e-5);
        }
    }
}

/// The network's parameter names are the file's (less `position_ids`, which is a buffer).
#[test]
fn parameter_names_match_the_file() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let te = dir.join("text_encoder");
    let cfg = ClipTextConfig::from_json_file(&te.join("config.json")).unwrap();
    let net = ClipTextModel::new(&cfg, &mut Init::new(&burn::tensor::Device::flex(), 0));
    let file = crate::common::read(&te.join("model.safetensors"));
    let file_shapes: std::collections::BTreeMap<String, Vec<usize>> =
        file.tensors.iter().filter(|(k, _)| !k.ends_with("position_ids")).map(|(k, t)| (k.clone(), t.shape.clone())).collect();
    assert_eq!(named_shapes(&net), file_shapes);
    // A freshly initialised network runs and gives finite features.
    let out = net.forward(ids_tensor(&[vec![0, 5, 7], vec![3, 2, 1]], &burn::tensor::Device::flex()));
    assert_eq!(out.dims(), [2, 3, 32]);
    let v = HostTensor::from_tensor(out).data;
    assert!(v.iter().all(|x| x.is_finite()));
}

/// SD v1.5's own file names every tensor `text_model.…` and holds a `position_ids` buffer.
#[test]
fn loads_prefixed_names_and_ignores_position_ids() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let te = dir.join("text_encoder");
    let file = crate::common::read(&te.join("model.safetensors"));
    let mut prefixed = NamedTensors::default();
    for (k, t) in &file.tensors {
        prefixed.insert(format!("text_model.{k}"), t.clone());
    }
    prefixed.insert("text_model.embeddings.position_ids", HostTensor::new(vec![1, 77], (0..77).map(|i| i as f32).collect()));
    let tmp = crate::common::scratch("sd_text_prefixed");
    std::fs::copy(te.join("config.json"), tmp.join("config.json")).unwrap();
    prefixed.write(&tmp.join("model.safetensors")).unwrap();

    let device = burn::tensor::Device::flex();
    let a = ClipTextModel::load(&te, &device).unwrap();
    let b = ClipTextModel::load(&tmp, &device).unwrap_or_else(|e| panic!("{e}"));
    let ids = ids_tensor(&[(0..77).map(|i| (i * 13) % 1000).collect()], &device);
    let (ya, yb) = (HostTensor::from_tensor(a.forward(ids.clone())), HostTensor::from_tensor(b.forward(ids)));
    assert_eq!(ya, yb);

    // A problem is reported under the file's own (prefixed) name.
    let key = "text_model.encoder.layers.0.mlp.fc2.bias";
    prefixed.tensors.remove(key);
    prefixed.write(&tmp.join("model.safetensors")).unwrap();
    let err = ClipTextModel::load(&tmp, &device).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains(key), "{err}");
}

#[test]
fn broken_text_encoder_files_give_one_line_errors() {
    let Some(dir) = crate::common::reference_dir("sd") else { return };
    let te = dir.join("text_encoder");
    let file = crate::common::read(&te.join("model.safetensors"));
    let device = burn::tensor::Device::flex();
    let tmp = crate::common::scratch("sd_text_broken");
    std::fs::copy(te.join("config.json"), tmp.join("config.json")).unwrap();
    let weights = tmp.join("model.safetensors");

    let check = |what: &str, must: &[&str]| {
        let err = ClipTextModel::load(&tmp, &device).expect_err(what).to_string();
        eprintln!("{what}: {err}");
        assert!(!err.contains('\n'), "{what}: several lines: {err}");
        for m in must {
            assert!(err.contains(m), "{what}: `{m}` not in: {err}");
        }
    };

    let key = "encoder.layers.1.self_attn.k_proj.weight";
    let mut missing = file.clone();
    missing.tensors.remove(key);
    missing.write(&weights).unwrap();
    check("missing tensor", &[key, "model.safetensors"]);

    let key = "embeddings.position_embedding.weight";
    let mut misshaped = file.clone();
    misshaped.insert(key, HostTensor::new(vec![76, 32], vec![0.0; 76 * 32]));
    misshaped.write(&weights).unwrap();
    check("mis-shaped tensor", &[key, "model.safetensors", "76"]);

    file.write(&weights).unwrap();
    let config = std::fs::read_to_string(te.join("config.json")).unwrap();
    std::fs::write(tmp.join("config.json"), config.replace("\"quick_gelu\"", "\"relu\"")).unwrap();
    check("unsupported activation", &["config.json", "relu"]);
    std::fs::write(tmp.join("config.json"), config.replace("\"hidden_size\": 32", "\"hidden_size\": \"wide\"")).unwrap();
    check("bad config value", &["config.json", "hidden_size"]);
}
