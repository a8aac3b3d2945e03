//! EDM's `SongUNet`: DDPM++ and NCSN++ of Song et al. (the CIFAR-10 teachers), with every
//! option of the original (embedding, encoder and decoder types, resample filter).

use crate::config::{DecoderType, EdmConfig, EmbeddingType, EncoderType};
use crate::nn::{cat_channels, silu, 
    label_dropout, BlockSpec, Conv2d, ConvSpec, FourierEmbedding, GroupNorm, Init, InitMode, InitSpec, Linear,
    ModuleDict, NoiseEmbedding, PositionalEmbedding, Resample, UNetBlock,
};
use burn::module::{Flag, Module, Param};
use burn::tensor::Tensor;

/// Entries of the encoder, in EDM's order; the name in the dict says which role (`*_aux_*`).
#[derive(Module, Debug)]
pub enum SongEncLayer {
    Conv(Conv2d),
    Block(UNetBlock),
    AuxDown(Conv2d),
    AuxSkip(Conv2d),
    AuxResidual(Conv2d),
}

#[derive(Module, Debug)]
pub enum SongDecLayer {
    Block(UNetBlock),
    AuxUp(Conv2d),
    AuxNorm(GroupNorm),
    AuxConv(Conv2d),
}

#[derive(Module, Debug)]
pub struct SongUNet {
    pub map_noise: NoiseEmbedding,
    pub map_label: Option<Linear>,
    pub map_augment: Option<Linear>,
    pub map_layer0: Linear,
    pub map_layer1: Linear,
    pub enc: ModuleDict<SongEncLayer>,
    pub dec: ModuleDict<SongDecLayer>,
    pub label_dropout: f64,
    pub training: Param<Flag>,
}

impl SongUNet {
    pub fn new(cfg: &EdmConfig, init: &mut Init) -> Self {
        let mc = cfg.model_channels();
        let mult = cfg.channel_mult();
        let emb_channels = mc * cfg.channel_mult_emb();
        let noise_channels = mc * cfg.channel_mult_noise();
        let filter = cfg.resample_filter();
        let init_w = InitSpec::new(InitMode::XavierUniform, 1.0, 0.0);
        let init_zero = InitSpec::new(InitMode::XavierUniform, 1e-5, 0.0);
        let init_attn = InitSpec::new(InitMode::XavierUniform, 0.2f64.sqrt(), 0.0);
        let spec = BlockSpec {
            emb_channels,
            num_heads: Some(1),
            channels_per_head: 64,
            dropout: cfg.dropout(),
            skip_scale: 0.5f64.sqrt(),
            eps: 1e-6,
            resample_filter: &filter,
            resample_proj: true,
            adaptive_scale: false,
            init: init_w,
            init_zero,
            init_attn,
        };
        let conv = |kernel: usize, resample: Resample, fused: bool, init_spec: InitSpec| ConvSpec {
            kernel,
            bias: true,
            resample,
            resample_filter: &filter,
            fused_resample: fused,
            init: init_spec,
        };

        let map_noise = match cfg.embedding_type() {
            EmbeddingType::Positional => NoiseEmbedding::Positional(PositionalEmbedding { num_channels: noise_channels, max_positions: 10000, endpoint: true }),
            EmbeddingType::Fourier => NoiseEmbedding::Fourier(FourierEmbedding::new(init, noise_channels, 16.0)),
        };
        let map_label = (cfg.label_dim > 0).then(|| Linear::new(init, cfg.label_dim, noise_channels, true, init_w));
        let map_augment = (cfg.augment_dim > 0).then(|| Linear::new(init, cfg.augment_dim, noise_channels, false, init_w));
        let map_layer0 = Linear::new(init, noise_channels, emb_channels, true, init_w);
        let map_layer1 = Linear::new(init, emb_channels, emb_channels, true, init_w);

        let attn = cfg.attn_resolutions();
        let (encoder, decoder) = (cfg.encoder_type(), cfg.decoder_type());
        let out_channels = cfg.img_channels;
        let mut enc = ModuleDict::default();
        let mut skips = Vec::new();
        let mut cout = cfg.img_channels;
        let mut caux = cfg.img_channels;
        for (level, &m) in mult.iter().enumerate() {
            let res = cfg.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = mc;
                enc.insert(format!("{res}x{res}_conv"), SongEncLayer::Conv(Conv2d::new(init, cin, cout, conv(3, Resample::None, false, init_w))));
                skips.push(cout);
            } else {
                enc.insert(format!("{res}x{res}_down"), SongEncLayer::Block(UNetBlock::new(init, cout, cout, Resample::Down, false, &spec)));
                skips.push(cout);
                if encoder == EncoderType::Skip {
                    let aux_down = Conv2d::new(init, caux, caux, ConvSpec { bias: false, ..conv(0, Resample::Down, false, init_w) });
                    enc.insert(format!("{res}x{res}_aux_down"), SongEncLayer::AuxDown(aux_down));
                    enc.insert(format!("{res}x{res}_aux_skip"), SongEncLayer::AuxSkip(Conv2d::new(init, caux, cout, conv(1, Resample::None, false, init_w))));
                }
                if encoder == EncoderType::Residual {
                    let residual = Conv2d::new(init, caux, cout, conv(3, Resample::Down, true, init_w));
                    enc.insert(format!("{res}x{res}_aux_residual"), SongEncLayer::AuxResidual(residual));
                    caux = cout;
                }
            }
            for idx in 0..cfg.num_blocks() {
                let cin = cout;
                cout = mc * m;
                let block = UNetBlock::new(init, cin, cout, Resample::None, attn.contains(&res), &spec);
                enc.insert(format!("{res}x{res}_block{idx}"), SongEncLayer::Block(block));
                skips.push(cout);
            }
        }

        let mut dec = ModuleDict::default();
        for (level, &m) in mult.iter().enumerate().rev() {
            let res = cfg.img_resolution >> level;
            if level == mult.len() - 1 {
                dec.insert(format!("{res}x{res}_in0"), SongDecLayer::Block(UNetBlock::new(init, cout, cout, Resample::None, true, &spec)));
                dec.insert(format!("{res}x{res}_in1"), SongDecLayer::Block(UNetBlock::new(init, cout, cout, Resample::None, false, &spec)));
            } else {
                dec.insert(format!("{res}x{res}_up"), SongDecLayer::Block(UNetBlock::new(init, cout, cout, Resample::Up, false, &spec)));
            }
            for idx in 0..=cfg.num_blocks() {
                let cin = cout + skips.pop().expect("one skip per encoder layer");
                cout = mc * m;
                let with_attn = idx == cfg.num_blocks() && attn.contains(&res);
                dec.insert(format!("{res}x{res}_block{idx}"), SongDecLayer::Block(UNetBlock::new(init, cin, cout, Resample::None, with_attn, &spec)));
            }
            if decoder == DecoderType::Skip || level == 0 {
                if decoder == DecoderType::Skip && level < mult.len() - 1 {
                    let aux_up = Conv2d::new(init, out_channels, out_channels, ConvSpec { bias: false, ..conv(0, Resample::Up, false, init_w) });
                    dec.insert(format!("{res}x{res}_aux_up"), SongDecLayer::AuxUp(aux_up));
                }
                dec.insert(format!("{res}x{res}_aux_norm"), SongDecLayer::AuxNorm(GroupNorm::new(init, cout, 1e-6)));
                dec.insert(format!("{res}x{res}_aux_conv"), SongDecLayer::AuxConv(Conv2d::new(init, cout, out_channels, conv(3, Resample::None, false, init_zero))));
            }
        }
        Self {
            map_noise,
            map_label,
            map_augment,
            map_layer0,
            map_layer1,
            enc,
            dec,
            label_dropout: cfg.label_dropout,
            training: Param::from_bool(true),
        }
    }

    pub fn forward(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>, augment_labels: Option<Tensor<2>>) -> Tensor<4> {
        let (mut x, mut skips, emb) = self.encode(x, noise_labels, class_labels, augment_labels);
        let mut aux: Option<Tensor<4>> = None;
        let mut tmp: Option<Tensor<4>> = None;
        for (_, layer) in self.dec.iter() {
            match layer {
                SongDecLayer::AuxUp(conv) => aux = aux.map(|a| conv.forward(a)),
                SongDecLayer::AuxNorm(norm) => tmp = Some(norm.forward(x.clone())),
                SongDecLayer::AuxConv(conv) => {
                    let t = conv.forward(silu(tmp.take().expect("aux_norm precedes aux_conv")));
                    aux = Some(match aux {
                        Some(a) => t + a,
                        None => t,
                    });
                }
                SongDecLayer::Block(block) => {
                    if x.dims()[1] != block.in_channels {
                        x = cat_channels(x, skips.pop().expect("skip available"));
                    }
                    x = block.forward(x, emb.clone());
                }
            }
        }
        aux.expect("the decoder ends with an output convolution")
    }

    /// The embedding and the encoder: (bottleneck, skips, embedding). The bottleneck is what
    /// DMD2's GAN head reads.
    pub fn encode(&self, x: Tensor<4>, noise_labels: Tensor<1>, class_labels: Option<Tensor<2>>, augment_labels: Option<Tensor<2>>) -> (Tensor<4>, Vec<Tensor<4>>, Tensor<2>) {
        let emb = self.map_noise.forward(noise_labels);
        // Swap the cos and sin halves, as EDM does for DDPM++/NCSN++.
        let half = emb.dims()[1] / 2;
        let mut emb = Tensor::cat(vec![emb.clone().narrow(1, half, half), emb.narrow(1, 0, half)], 1);
        if let (Some(map_label), Some(labels)) = (&self.map_label, class_labels) {
            let scale = (map_label.in_features() as f64).sqrt();
            emb = emb + map_label.forward(label_dropout(labels, self.label_dropout, &self.training).mul_scalar(scale));
        }
        if let (Some(map_augment), Some(aug)) = (&self.map_augment, augment_labels) {
            emb = emb + map_augment.forward(aug);
        }
        let emb = silu(self.map_layer0.forward(emb));
        let emb = silu(self.map_layer1.forward(emb));

        let mut x = x;
        let mut aux = x.clone();
        let mut skips: Vec<Tensor<4>> = Vec::new();
        for (_, layer) in self.enc.iter() {
            match layer {
                SongEncLayer::AuxDown(conv) => aux = conv.forward(aux),
                SongEncLayer::AuxSkip(conv) => {
                    x = x + conv.forward(aux.clone());
                    *skips.last_mut().expect("a skip precedes aux_skip") = x.clone();
                }
                SongEncLayer::AuxResidual(conv) => {
                    x = (x + conv.forward(aux)).div_scalar(2f64.sqrt());
                    aux = x.clone();
                    *skips.last_mut().expect("a skip precedes aux_residual") = x.clone();
                }
                SongEncLayer::Conv(conv) => {
                    x = conv.forward(x);
                    skips.push(x.clone());
                }
                SongEncLayer::Block(block) => {
                    x = block.forward(x, emb.clone());
                    skips.push(x.clone());
                }
            }
        }
        (x, skips, emb)
    }
}
