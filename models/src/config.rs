//! The network configuration: EDM's `EDMPrecond` constructor keyword arguments, read from the
//! JSON that EDM keeps as a pickle's `init_kwargs` (what `tools/edm_to_safetensors.py` writes).
//! Unset keys take the defaults of the class named by `model_type`, as in EDM.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdmConfig {
    pub img_resolution: usize,
    pub img_channels: usize,
    #[serde(default)]
    pub label_dim: usize,
    /// Accepted for compatibility with EDM's kwargs; precision is chosen at run time here.
    #[serde(default)]
    pub use_fp16: bool,
    #[serde(default)]
    pub sigma_min: f64,
    /// `null` (or absent) means unbounded, EDM's `float('inf')`.
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default = "default_sigma_data")]
    pub sigma_data: f64,
    #[serde(default = "default_model_type")]
    pub model_type: ModelType,

    // Keyword arguments of the backbone. `None`: the class default.
    #[serde(default)]
    pub augment_dim: usize,
    #[serde(default)]
    pub model_channels: Option<usize>,
    #[serde(default)]
    pub channel_mult: Option<Vec<usize>>,
    #[serde(default)]
    pub channel_mult_emb: Option<usize>,
    #[serde(default)]
    pub num_blocks: Option<usize>,
    #[serde(default)]
    pub attn_resolutions: Option<Vec<usize>>,
    #[serde(default)]
    pub dropout: Option<f64>,
    #[serde(default)]
    pub label_dropout: f64,
    /// ADM only (EDM hard-codes 64 channels per attention head there).
    #[serde(default)]
    pub channels_per_head: Option<usize>,

    // SongUNet only.
    #[serde(default)]
    pub embedding_type: Option<EmbeddingType>,
    #[serde(default)]
    pub channel_mult_noise: Option<usize>,
    #[serde(default)]
    pub encoder_type: Option<EncoderType>,
    #[serde(default)]
    pub decoder_type: Option<DecoderType>,
    #[serde(default)]
    pub resample_filter: Option<Vec<f64>>,

    // ToyMLP only.
    #[serde(default)]
    pub hidden_dim: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
}

fn default_sigma_data() -> f64 {
    0.5
}

fn default_model_type() -> ModelType {
    ModelType::DhariwalUNet
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelType {
    DhariwalUNet,
    SongUNet,
    /// A small MLP for 2-D toy data, points stored as [N, 2, 1, 1] images.
    ToyMLP,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingType {
    Positional,
    Fourier,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderType {
    Standard,
    Skip,
    Residual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderType {
    Standard,
    Skip,
}

/// A configuration problem, with the file it came from when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("network config: {0}")]
    Invalid(String),
}

/// A JSON error in one line, led by the key whose value it is about (serde names only unknown
/// or missing keys itself): `channel_mult: invalid value: integer `-2`, expected usize at ...`;
/// without `at line L column C` unless `position` (no use for text the user never saw).
pub fn json_error(text: &str, e: &serde_json::Error, position: bool) -> String {
    let mut msg = e.to_string().replace('\n', " ");
    if !position && e.line() > 0 {
        if let Some((m, _)) = msg.rsplit_once(" at line ") {
            msg = m.to_string();
        }
    }
    match key_before(text, e.line(), e.column()) {
        Some(key) if !msg.contains(&format!("`{key}`")) => format!("{key}: {msg}"),
        _ => msg,
    }
}

/// The last object key (`"key":`) in `text` before 1-based (line, column); `None` at 0 (no
/// position) or when there is none.
fn key_before(text: &str, line: usize, column: usize) -> Option<String> {
    if line == 0 {
        return None;
    }
    let start: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum();
    let end = (start + column).min(text.len());
    let prefix = text.get(..end)?;
    let mut key = None;
    let mut rest = prefix;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else { break };
        let (word, tail) = (&after[..close], &after[close + 1..]);
        if tail.trim_start().starts_with(':') {
            key = Some(word.to_string());
        }
        rest = tail;
    }
    key
}

impl EdmConfig {
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_json_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the keys and their types only; [`EdmConfig::validate`] checks the values.
    pub fn parse_json_str(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Invalid(json_error(text, &e, false)))
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let file_err = |msg: String| ConfigError::File { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| file_err(json_error(&text, &e, true)))?;
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Writes every key, defaults resolved, so the file says exactly what was built.
    pub fn resolved(&self) -> Self {
        let mut c = self.clone();
        c.dropout = Some(self.dropout());
        if self.model_type != ModelType::ToyMLP {
            c.model_channels = Some(self.model_channels());
            c.channel_mult = Some(self.channel_mult());
            c.channel_mult_emb = Some(self.channel_mult_emb());
            c.num_blocks = Some(self.num_blocks());
            c.attn_resolutions = Some(self.attn_resolutions());
        }
        match self.model_type {
            ModelType::DhariwalUNet => c.channels_per_head = Some(self.channels_per_head()),
            ModelType::SongUNet => {
                c.embedding_type = Some(self.embedding_type());
                c.channel_mult_noise = Some(self.channel_mult_noise());
                c.encoder_type = Some(self.encoder_type());
                c.decoder_type = Some(self.decoder_type());
                c.resample_filter = Some(self.resample_filter());
            }
            ModelType::ToyMLP => {
                c.hidden_dim = Some(self.hidden_dim());
                c.num_layers = Some(self.num_layers());
            }
        }
        c
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.img_channels == 0 {
            return bad("img_channels must be positive".into());
        }
        if !(self.sigma_data > 0.0) {
            return bad(format!("sigma_data must be positive, got {}", self.sigma_data));
        }
        if !(self.sigma_min >= 0.0 && self.sigma_min.is_finite()) || self.sigma_max.is_some_and(|m| !(m > self.sigma_min)) {
            return bad(format!("need 0 <= sigma_min < sigma_max, got sigma_min {} and sigma_max {}", self.sigma_min, self.sigma_max()));
        }
        let song_only = [
            ("embedding_type", self.embedding_type.is_some()),
            ("channel_mult_noise", self.channel_mult_noise.is_some()),
            ("encoder_type", self.encoder_type.is_some()),
            ("decoder_type", self.decoder_type.is_some()),
            ("resample_filter", self.resample_filter.is_some()),
        ];
        let mlp_only = [("hidden_dim", self.hidden_dim.is_some()), ("num_layers", self.num_layers.is_some())];
        let reject = |keys: &[(&str, bool)], what: &str| -> Result<(), ConfigError> {
            match keys.iter().find(|(_, set)| *set) {
                Some((k, _)) => bad(format!("key `{k}` does not apply to model_type {what}")),
                None => Ok(()),
            }
        };
        match self.model_type {
            ModelType::DhariwalUNet => {
                reject(&song_only, "DhariwalUNet")?;
                reject(&mlp_only, "DhariwalUNet")?;
            }
            ModelType::SongUNet => {
                reject(&mlp_only, "SongUNet")?;
                if self.channels_per_head.is_some() {
                    return bad("key `channels_per_head` does not apply to SongUNet (one head per attention block)".into());
                }
                let f = self.resample_filter();
                if f.is_empty() || f.iter().sum::<f64>() == 0.0 {
                    return bad(format!("resample_filter {f:?} must be non-empty with a non-zero sum"));
                }
                if self.channel_mult_noise() == 0 {
                    return bad("channel_mult_noise must be positive".into());
                }
            }
            ModelType::ToyMLP => {
                reject(&song_only, "ToyMLP")?;
                let unet_only = [
                    ("model_channels", self.model_channels.is_some()),
                    ("channel_mult", self.channel_mult.is_some()),
                    ("channel_mult_emb", self.channel_mult_emb.is_some()),
                    ("num_blocks", self.num_blocks.is_some()),
                    ("attn_resolutions", self.attn_resolutions.is_some()),
                    ("channels_per_head", self.channels_per_head.is_some()),
                    ("augment_dim", self.augment_dim > 0),
                ];
                reject(&unet_only, "ToyMLP")?;
                if self.img_resolution != 1 {
                    return bad(format!("ToyMLP works on points stored as 1x1 images: img_resolution must be 1, got {}", self.img_resolution));
                }
                if self.num_layers() == 0 || self.hidden_dim() == 0 {
                    return bad("ToyMLP needs num_layers >= 1 and hidden_dim >= 1".into());
                }
                return Ok(());
            }
        }
        let mult = self.channel_mult();
        if mult.is_empty() {
            return bad("channel_mult must not be empty".into());
        }
        if mult.contains(&0) {
            return bad(format!("channel_mult {mult:?}: a 0 gives a level without channels; every entry must be positive"));
        }
        let levels = mult.len() as u32;
        // (2^(levels - 1); 0 when that does not fit, as for 65 levels.)
        let halved = 1usize.checked_shl(levels - 1).unwrap_or(0);
        if self.img_resolution == 0 || halved == 0 || self.img_resolution % halved != 0 {
            return bad(format!(
                "img_resolution {} cannot be halved {} times (channel_mult has {} levels)",
                self.img_resolution,
                levels - 1,
                levels
            ));
        }
        if self.model_channels() == 0 {
            return bad("model_channels must be positive".into());
        }
        let dropout = self.dropout();
        if !(0.0..1.0).contains(&dropout) || !(0.0..1.0).contains(&self.label_dropout) {
            return bad(format!("dropout ({dropout}) and label_dropout ({}) must lie in [0, 1)", self.label_dropout));
        }
        if self.model_type == ModelType::DhariwalUNet {
            // EDM gives an attention block out_channels // channels_per_head heads (none when
            // that is 0); the channels must split evenly between them.
            let cph = self.channels_per_head();
            if cph == 0 {
                return bad("channels_per_head must be positive".into());
            }
            for m in &mult {
                let Some(ch) = self.model_channels().checked_mul(*m) else {
                    return bad(format!("model_channels {} x channel_mult {m} overflows", self.model_channels()));
                };
                let heads = ch / cph;
                if heads > 0 && ch % heads != 0 {
                    return bad(format!("{ch} channels do not split into {heads} attention heads (channels_per_head = {cph})"));
                }
            }
        }
        Ok(())
    }

    fn is_song(&self) -> bool {
        self.model_type == ModelType::SongUNet
    }

    pub fn model_channels(&self) -> usize {
        self.model_channels.unwrap_or(if self.is_song() { 128 } else { 192 })
    }
    pub fn channel_mult(&self) -> Vec<usize> {
        self.channel_mult.clone().unwrap_or(if self.is_song() { vec![1, 2, 2, 2] } else { vec![1, 2, 3, 4] })
    }
    pub fn channel_mult_emb(&self) -> usize {
        self.channel_mult_emb.unwrap_or(4)
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks.unwrap_or(if self.is_song() { 4 } else { 3 })
    }
    pub fn attn_resolutions(&self) -> Vec<usize> {
        self.attn_resolutions.clone().unwrap_or(if self.is_song() { vec![16] } else { vec![32, 16, 8] })
    }
    pub fn dropout(&self) -> f64 {
        self.dropout.unwrap_or(if self.model_type == ModelType::ToyMLP { 0.0 } else { 0.10 })
    }
    pub fn channels_per_head(&self) -> usize {
        self.channels_per_head.unwrap_or(64)
    }
    pub fn embedding_type(&self) -> EmbeddingType {
        self.embedding_type.unwrap_or(EmbeddingType::Positional)
    }
    pub fn channel_mult_noise(&self) -> usize {
        self.channel_mult_noise.unwrap_or(1)
    }
    pub fn encoder_type(&self) -> EncoderType {
        self.encoder_type.unwrap_or(EncoderType::Standard)
    }
    pub fn decoder_type(&self) -> DecoderType {
        self.decoder_type.unwrap_or(DecoderType::Standard)
    }
    pub fn resample_filter(&self) -> Vec<f64> {
        self.resample_filter.clone().unwrap_or(vec![1.0, 1.0])
    }
    pub fn hidden_dim(&self) -> usize {
        self.hidden_dim.unwrap_or(256)
    }
    pub fn num_layers(&self) -> usize {
        self.num_layers.unwrap_or(4)
    }
    /// EDM's `sigma_max` (unbounded when unset).
    pub fn sigma_max(&self) -> f64 {
        self.sigma_max.unwrap_or(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_configs_validate_and_keep_their_meaning() {
        for json in [
            r#"{"img_resolution": 16, "img_channels": 3, "model_type": "DhariwalUNet"}"#,
            r#"{"img_resolution": 32, "img_channels": 3, "model_type": "SongUNet", "label_dim": 10}"#,
            r#"{"img_resolution": 1, "img_channels": 2, "model_type": "ToyMLP"}"#,
        ] {
            let c = EdmConfig::from_json_str(json).unwrap();
            let r = EdmConfig::from_json_str(&c.resolved().to_json()).unwrap();
            assert_eq!(r.resolved(), c.resolved());
            assert_eq!(r.channel_mult(), c.channel_mult());
        }
    }

    #[test]
    fn edm_defaults_follow_the_model_type() {
        let adm = EdmConfig::from_json_str(r#"{"img_resolution": 64, "img_channels": 3}"#).unwrap();
        assert_eq!((adm.model_channels(), adm.channel_mult(), adm.num_blocks()), (192, vec![1, 2, 3, 4], 3));
        assert_eq!(adm.attn_resolutions(), vec![32, 16, 8]);
        let song = EdmConfig::from_json_str(r#"{"img_resolution": 32, "img_channels": 3, "model_type": "SongUNet"}"#).unwrap();
        assert_eq!((song.model_channels(), song.channel_mult(), song.num_blocks()), (128, vec![1, 2, 2, 2], 4));
        assert_eq!(song.sigma_max(), f64::INFINITY);
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_key() {
        let err = |j: &str| EdmConfig::from_json_str(j).unwrap_err().to_string();
        assert!(err(r#"{"img_resolution": 16, "img_channels": 3, "encoder_type": "residual"}"#).contains("encoder_type"));
        assert!(err(r#"{"img_resolution": 12, "img_channels": 3, "channel_mult": [1, 2, 2, 2]}"#).contains("img_resolution 12"));
        assert!(err(r#"{"img_resolution": 16, "img_channels": 3, "model_type": "SongUNet", "encoder_type": "fancy"}"#).contains("fancy"));
    }
}
