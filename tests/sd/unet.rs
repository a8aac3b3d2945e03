//! Stable Diffusion's `UNet2DConditionModel` against diffusers (`../shared/reference/sd/unet`:
//! a tiny random UNet with SD v1.5's structure, channels (32, 64, 64), 8 heads, cross-attention
//! width 32): the epsilon prediction, the errors for a damaged weights file or an unsupported
//! config, the save -> load round trip, and a backward pass on an autodiff device.


use burn::tensor::{Device, Tensor};
use crate::common::*;
use dmd_models::nn::Init;
use dmd_models::sd::unet::{UNet2DCondition, UNetConfig, CONFIG_FILE, WEIGHTS_FILE};
use dmd_models::{HostTensor, NamedTensors};

/// The reference UNet's configuration (SD v1.5's block layout, shrunk).
const TINY: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "sample_size": 16, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "block_out_channels": [32, 64, 64], "layers_per_block": 1,
  "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32
}"#;

fn tiny() -> UNetConfig {
    UNetConfig::from_json_str(TINY).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1].
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.0) - 1.0).collect()
}

fn inputs(device: &Device, batch: usize, side: usize) -> (Tensor<4>, Tensor<1>, Tensor<3>) {
    let x = HostTensor::new(vec![batch, 4, side, side], values(batch * 4 * side * side, 1)).to_tensor(device);
    let t = HostTensor::new(vec![batch], (0..batch).map(|i| 999.0 - 480.0 * i as f32).collect()).to_tensor(device);
    let c = HostTensor::new(vec![batch, 7, 32], values(batch * 7 * 32, 5)).to_tensor(device);
    (x, t, c)
}

#[test]
fn unet_matches_diffusers() {
    let Some(dir) = reference_dir("sd") else { return };
    let cases = read(&dir.join("sd_cases.safetensors"));
    // `unet_timesteps` is int64 in the file; NamedTensors reads it as float32 (exact here).
    let t = get(&cases, "unet_timesteps");
    assert_eq!(t.data, vec![999.0, 500.0]);
    for (backend, device) in cpu_backends() {
        let unet = UNet2DCondition::load(&dir.join("unet"), &device).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unet.config().sample_size, 16);
        assert_eq!(unet.mid_channels(), 64);
        let (eps, mid) = unet.forward_with_mid(
            get(&cases, "unet_latents").to_tensor(&device),
            t.to_tensor(&device),
            get(&cases, "text_embeddings").to_tensor(&device),
        );
        assert_eq!(mid.dims(), [2, 64, 4, 4]);
        assert_close(&format!("unet eps [{backend}]"), &HostTensor::from_tensor(eps), get(&cases, "unet_eps"), 1e-5);
    }
}

/// A weights file with one tensor missing, or one of the wrong shape, is refused with an error
/// naming the file and the tensor.
#[test]
fn damaged_weights_name_the_tensor() {
    let device = Device::flex();
    let unet = UNet2DCondition::new(&tiny(), &mut Init::new(&device, 3));
    let good = scratch("sd_unet_damaged/good");
    unet.save(&good).unwrap();
    let tensors = read(&good.join(WEIGHTS_FILE));
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert_eq!(get(&tensors, key).shape, vec![32, 32]);

    let damaged = |name: &str, edit: &dyn Fn(&mut NamedTensors)| {
        let dir = scratch(&format!("sd_unet_damaged/{name}"));
        std::fs::copy(good.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
        let mut t = tensors.clone();
        edit(&mut t);
        t.write(&dir.join(WEIGHTS_FILE)).unwrap();
        let err = UNet2DCondition::load(&dir, &device).expect_err("damaged file must be refused").to_string();
        eprintln!("{name}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains(WEIGHTS_FILE), "names the file: {err}");
        err
    };
    let err = damaged("missing", &|t| {
        t.tensors.remove(key);
    });
    assert!(err.contains(key) && err.contains("missing"), "{err}");
    let err = damaged("shape", &|t| {
        t.insert(key, HostTensor::new(vec![32, 16], vec![0.0; 32 * 16]));
    });
    assert!(err.contains(key) && err.contains("[32, 16]"), "{err}");
    let err = damaged("mid", &|t| {
        t.tensors.remove("mid_block.resnets.1.conv2.bias");
    });
    assert!(err.contains("mid_block.resnets.1.conv2.bias"), "{err}");
}

/// Options the port lacks are refused naming the file and the key; bad values name the key.
#[test]
fn unsupported_config_names_the_key() {
    let dir = scratch("sd_unet_config");
    let cases: &[(&str, &str)] = &[
        (r#""class_embed_type": "timestep""#, "class_embed_type"),
        (r#""down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]"#, "down_block_types"),
        (r#""num_attention_heads": 8"#, "num_attention_heads"),
        (r#""resnet_time_scale_shift": "scale_shift""#, "resnet_time_scale_shift"),
        (r#""layers_per_block": "two""#, "layers_per_block"),
        (r#""attention_head_dim": 5"#, "attention_head_dim"),
    ];
    for (entry, key) in cases {
        let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(TINY).unwrap();
        let over: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&format!("{{{entry}}}")).unwrap();
        map.extend(over);
        let text = serde_json::to_string_pretty(&map).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
        let err = UNet2DCondition::load(&dir, &Device::flex()).expect_err("unsupported config").to_string();
        eprintln!("{err}");
        assert!(err.contains(CONFIG_FILE) && err.contains(key), "{key}: {err}");
    }
}

/// A randomly initialised UNet saved in diffusers' layout loads back to the same function,
/// and the config round-trips (unknown keys included).
#[test]
fn save_load_round_trip() {
    let device = Device::flex();
    let mut cfg = tiny();
    cfg.other.insert("_diffusers_version".into(), serde_json::Value::from("0.42.1"));
    let unet = UNet2DCondition::new(&cfg, &mut Init::new(&device, 11));
    let dir = scratch("sd_unet_round_trip");
    unet.save(&dir).unwrap();
    let back = UNet2DCondition::load(&dir, &device).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.config(), unet.config());

    let names = read(&dir.join(WEIGHTS_FILE));
    for key in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias",
        "down_blocks.1.downsamplers.0.conv.weight",
        "mid_block.attentions.0.norm.weight",
        "up_blocks.0.resnets.1.conv_shortcut.weight",
        "up_blocks.1.upsamplers.0.conv.weight",
        "up_blocks.2.attentions.1.proj_out.bias",
        "conv_norm_out.weight",
        "conv_out.bias",
    ] {
        assert!(names.get(key).is_some(), "saved file lacks `{key}`");
    }
    assert_eq!(get(&names, "down_blocks.0.attentions.0.proj_in.weight").shape, vec![32, 32, 1, 1]);
    assert_eq!(get(&names, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight").shape, vec![256, 32]);
    assert!(names.get("down_blocks.2.downsamplers.0.conv.weight").is_none());

    let (x, t, c) = inputs(&device, 2, 16);
    let a = HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()));
    let b = HostTensor::from_tensor(back.forward(x, t, c));
    assert_eq!(a, b, "a saved and reloaded UNet computes the same output");

    // Odd latent sizes take diffusers' upsample-to-the-skip's-size path.
    let (x, t, c) = inputs(&device, 1, 10);
    let (eps, mid) = back.forward_with_mid(x, t, c);
    assert_eq!(eps.dims(), [1, 4, 10, 10]);
    assert_eq!(mid.dims(), [1, 64, 3, 3]);
}

/// One backward pass on an autodiff device (the UNet is trained as DMD2's generator and fake
/// score): finite, non-zero gradients for the input and for parameters deep in the network.
#[test]
fn backward_gives_finite_gradients() {
    let ad = Device::flex().autodiff();
    let unet = UNet2DCondition::new(&tiny(), &mut Init::new(&ad, 5));
    let (x, t, c) = inputs(&ad, 2, 8);
    let x = x.require_grad();
    let (eps, mid) = unet.forward_with_mid(x.clone(), t, c);
    let loss = eps.square().mean() + mid.mean();
    let grads = loss.backward();
    let check = |what: &str, g: Option<Tensor<4>>| {
        let g = HostTensor::from_tensor(g.unwrap_or_else(|| panic!("{what}: no gradient")));
        assert!(g.data.iter().all(|v| v.is_finite()), "{what}: non-finite gradient");
        assert!(g.data.iter().any(|v| *v != 0.0), "{what}: zero gradient");
    };
    let check2 = |what: &str, g: Option<Tensor<2>>| check(what, g.map(|g| g.unsqueeze::<4>()));
    check("latents", x.grad(&grads));
    check("conv_in.weight", unet.conv_in.weight.val().grad(&grads));
    check("conv_out.weight", unet.conv_out.weight.val().grad(&grads));
    check2("time_embedding.linear_1.weight", unet.time_embedding.linear_1.weight.val().grad(&grads));
    let block = &unet.down_blocks[0].attentions[0].transformer_blocks[0];
    check2("attn2.to_k.weight", block.attn2.to_k.weight.val().grad(&grads));
    check2("attn1.to_q.weight", block.attn1.to_q.weight.val().grad(&grads));
    check2("mid_block transformer to_v", unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v.weight.val().grad(&grads));
}

/// `use_linear_projection: true` (SD 2.x's layout) makes proj_in / proj_out Linear layers.
#[test]
fn linear_projection_variant_runs() {
    let device = Device::flex();
    let mut cfg = tiny();
    cfg.use_linear_projection = true;
    let unet = UNet2DCondition::new(&cfg, &mut Init::new(&device, 2));
    let names = dmd_models::weights::named_tensors(&unet);
    assert_eq!(get(&names, "down_blocks.1.attentions.0.proj_in.weight").shape, vec![64, 64]);
    let (x, t, c) = inputs(&device, 1, 8);
    let eps = HostTensor::from_tensor(unet.forward(x, t, c));
    assert_eq!(eps.shape, vec![1, 4, 8, 8]);
    assert!(eps.data.iter().all(|v| v.is_finite()));
}

/// SD v1.5's full-size UNet has 859,520,964 parameters (diffusers). Ignored by default: it
/// allocates 3.4 GB. `cargo test --test sd sd15_parameter_count -- --ignored`.
#[test]
#[ignore]
fn sd15_parameter_count() {
    let cfg = UNetConfig::sd15();
    let unet = UNet2DCondition::new(&cfg, &mut Init::placeholder(&Device::flex()));
    let total: usize = dmd_models::weights::named_shapes(&unet).values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(total, 859_520_964);
}
