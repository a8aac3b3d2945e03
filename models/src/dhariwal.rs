//! EDM's `DhariwalUNet`: the ADM architecture of "Diffusion Models Beat GANs" (the
//! ImageNet-64 teacher). Layer names follow EDM so its `state_dict` loads as is.

use crate::config::EdmConfig;
use crate::nn::{cat_channels, silu, 
    BlockSpec, Conv2d, ConvSpec, GroupNorm, Init, InitMode, InitSpec, Linear, ModuleDict, PositionalEmbedding,
    Resample, UNetBlock,
};
use burn::module::{Flag, Module, Param};
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub enum AdmLayer {
    Conv(Conv2d),
    Block(UNetBlock),
}

#[derive(Module, Debug)]
pub struct DhariwalUNet {
    pub map_noise: PositionalEmbedding,
    pub map_augment: Option<Linear>,
    pub map_layer0: Linear,
    pub map_layer1: Linear,
    pub map_label: Option<Linear>,
    pub enc: ModuleDict<AdmLayer>,
    pub dec: ModuleDict<UNetBlock>,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
    pub label_dropout: f64,
    /// Enables label dropout in training (Burn's `valid()` turns it off).
    pub training: Param<Flag>,
}

impl DhariwalUNet {
    pub fn new(cfg: &EdmConfig, init: &mut Init) -> Self {
        let mc = cfg.model_channels();
        let mult = cfg.channel_mult();
        let emb_channels = mc * cfg.channel_mult_emb();
        let s3 = (1.0f64 / 3.0).sqrt();
        let init_w = InitSpec::new(InitMode::KaimingUniform, s3, s3);
        let init_zero = InitSpec::new(InitMode::KaimingUniform, 0.0, 0.0);
        let spec = BlockSpec {
            emb_channels,
            num_heads: None,
            channels_per_head: cfg.channels_per_head(),
            dropout: cfg.dropout(),
            skip_scale: 1.0,
            eps: 1e-5,
            resample_filter: &[1.0, 1.0],
            resample_proj: false,
            adaptive_scale: true,
            init: init_w,
            init_zero,
            init_attn: init_w,
        };

        let map_noise = PositionalEmbedding { num_channels: mc, max_positions: 10000, endpoint: false };
        let map_augment = (cfg.augment_dim > 0).then(|| Linear::new(init, cfg.augment_dim, mc, false, init_zero));
        let map_layer0 = Linear::new(init, mc, emb_channels, true, init_w);
        let map_layer1 = Linear::new(init, emb_channels, emb_channels, true, init_w);
        let map_label = (cfg.label_dim > 0).then(|| {
            let spec = InitSpec::new(InitMode::KaimingNormal, (cfg.label_dim as f64).sqrt(), 0.0);
            Linear::new(init, cfg.label_dim, emb_channels, false, spec)
        });

        let attn = cfg.attn_resolutions();
        let mut enc = ModuleDict::default();
        let mut skips = Vec::new();
        let mut cout = cfg.img_channels;
        for (level, &m) in mult.iter().enumerate() {
            let res = cfg.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = mc * m;
                let conv = ConvSpec { kernel: 3, bias: true, resample: Resample::None, resample_filter: &[1.0, 1.0], fused_resample: false, init: init_w };
                enc.insert(format!("{res}x{res}_conv"), AdmLayer::Conv(Conv2d::new(init, cin, cout, conv)));
            } else {
                enc.insert(format!("{res}x{res}_down"), AdmLayer::Block(UNetBlock::new(init, cout, cout, Resample::Down, false, &spec)));
            }
            skips.push(cout);
            for idx in 0..cfg.num_blocks() {
                let cin = cout;
                cout = mc * m;
                let block = UNetBlock::new(init, cin, cout, Resample::None, attn.contains(&res), &spec);
                enc.insert(format!("{res}x{res}_block{idx}"), AdmLayer::Block(block));
                skips.push(cout);
            }
        }

        let mut dec = ModuleDict::default();
        for (level, &m) in mult.iter().enumerate().rev() {
            let res = cfg.img_resolution >> level;
            if level == mult.len() - 1 {
                dec.insert(format!("{res}x{res}_in0"), UNetBlock::new(init, cout, cout, Resample::None, true, &spec));
                dec.insert(format!("{res}x{res}_in1"), UNetBlock::new(init, cout, cout, Resample::None, false, &spec));
            } else {
                dec.insert(format!("{res}x{res}_up"), UNetBlock::new(init, cout, cout, Resample::Up, false, &spec));
            }
            for idx in 0..=cfg.num_blocks() {
                let cin = cout + skips.pop().expect("one skip per encoder layer");
                cout = mc * m;
                dec.insert(format!("{res}x{res}_block{idx}"), UNetBlock::new(init, cin, cout, Resample::None, attn.contains(&res), &spec));
            }
        }
        let out_norm = GroupNorm::new(init, cout, 1e-5);
        let conv = ConvSpec { kernel: 3, bias: true, resample: Resample::None, resample_filter: &[1.0, 1.0], fused_resample: false, init: init_zero };
        let out_conv = Conv2d::new(init, cout, cfg.img_channels, conv);
        Self { map_noise, map_augment, map_layer0, map_layer1, map_label, enc, dec, out_norm, out_conv, label_dropout: cfg.label_dropout, training: Param::from_bool(true) }
    }

    /// `noise_labels` [N]; `class_labels` [N or 1, label_dim] (already scaled by the caller).
    pub fn forward(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>, augment_labels: Option<Tensor<2>>) -> Tensor<4> {
        let (mut x, mut skips, emb) = self.encode(x, noise_labels, class_labels, augment_labels);
        for (_, block) in self.dec.iter() {
            if x.dims()[1] != block.in_channels {
                x = cat_channels(x, skips.pop().expect("skip available"));
            }
            x = block.forward(x, emb.clone());
        }
        self.out_conv.forward(self.out_norm.forward_silu(x, None))
    }

    /// The embedding and the encoder: (bottleneck, skips, embedding). The bottleneck is what
    /// DMD2's GAN head reads.
    pub fn encode(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>, augment_labels: Option<Tensor<2>>) -> (Tensor<4>, Vec<Tensor<4>>, Tensor<2>) {
        let mut emb = self.map_noise.forward(noise_labels);
        if let (Some(map_augment), Some(aug)) = (&self.map_augment, augment_labels) {
            emb = emb + map_augment.forward(aug);
        }
        let emb = silu(self.map_layer0.forward(emb));
        let mut emb = self.map_layer1.forward(emb);
        if let (Some(map_label), Some(labels)) = (&self.map_label, class_labels) {
            emb = emb + map_label.forward(crate::nn::label_dropout(labels, self.label_dropout, &self.training));
        }
        let emb = silu(emb);

        let mut x = x;
        let mut skips = Vec::new();
        for (_, layer) in self.enc.iter() {
            x = match layer {
                AdmLayer::Conv(conv) => conv.forward(x),
                AdmLayer::Block(block) => block.forward(x, emb.clone()),
            };
            skips.push(x.clone());
        }
        (x, skips, emb)
    }
}
