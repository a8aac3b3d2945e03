//! Image datasets: EDM's format (a folder or zip of PNGs with an optional `dataset.json`
//! holding `labels`, as EDM's `dataset_tool.py` writes it; ImageNet-64 and CIFAR-10 come this
//! way) and MNIST-style IDX files (MNIST, Fashion-MNIST). Pixels stay uint8 CHW until a batch
//! is made; `to_model_space` maps them to EDM's [-1, 1].

use flate2::read::GzDecoder;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
}

fn err(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> DataError {
    DataError::File { path: path.as_ref().display().to_string(), msg: msg.to_string() }
}

enum Source {
    /// All images in memory, CHW uint8, one after the other.
    Memory(Vec<u8>),
    Folder(PathBuf, Vec<String>),
    Zip(PathBuf, Mutex<zip::ZipArchive<File>>, Vec<String>),
}

/// A labelled or unlabelled set of equally sized uint8 images.
pub struct ImageDataset {
    source: Source,
    /// [C, H, W]
    pub shape: [usize; 3],
    labels: Option<Vec<usize>>,
    /// Number of classes (max label + 1, or what the source declares); 0 when unlabelled.
    pub label_dim: usize,
    pub name: String,
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg", ".bmp", ".webp"].iter().any(|e| lower.ends_with(e))
}

/// Decodes one image to CHW uint8 (grayscale stays one channel, alpha is dropped).
pub fn decode_image(bytes: &[u8], what: &str) -> Result<(Vec<u8>, [usize; 3]), String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("{what}: cannot decode image: {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (c, hwc): (usize, Vec<u8>) = match img.color().channel_count() {
        1 | 2 => (1, img.into_luma8().into_raw()),
        _ => (3, img.into_rgb8().into_raw()),
    };
    let mut chw = vec![0u8; c * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                chw[ch * h * w + y * w + x] = hwc[(y * w + x) * c + ch];
            }
        }
    }
    Ok((chw, [c, h, w]))
}

impl ImageDataset {
    /// Opens EDM's dataset format: a folder or a `.zip` of images, with `dataset.json`.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let (source, names, labels_json) = if path.is_dir() {
            let mut names = Vec::new();
            collect_files(path, path, &mut names).map_err(|e| err(path, e))?;
            names.sort();
            let json = std::fs::read_to_string(path.join("dataset.json")).ok();
            let images: Vec<String> = names.into_iter().filter(|n| is_image(n)).collect();
            (Source::Folder(path.to_path_buf(), images.clone()), images, json)
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip")) {
            let file = File::open(path).map_err(|e| err(path, e))?;
            let mut zip = zip::ZipArchive::new(file).map_err(|e| err(path, format!("not a readable zip: {e}")))?;
            let mut names: Vec<String> = zip.file_names().map(str::to_string).collect();
            names.sort();
            let json = match zip.by_name("dataset.json") {
                Ok(mut f) => {
                    let mut s = String::new();
                    f.read_to_string(&mut s).map_err(|e| err(path, format!("dataset.json: {e}")))?;
                    Some(s)
                }
                Err(_) => None,
            };
            let images: Vec<String> = names.into_iter().filter(|n| is_image(n)).collect();
            (Source::Zip(path.to_path_buf(), Mutex::new(zip), images.clone()), images, json)
        } else if !path.exists() {
            return Err(err(path, "no such file or folder"));
        } else {
            return Err(err(path, "expected a folder or a .zip of images (EDM's dataset format)"));
        };
        if names.is_empty() {
            return Err(err(path, "contains no images"));
        }
        let labels = match labels_json {
            Some(text) => parse_labels(&text, &names).map_err(|e| err(path, format!("dataset.json: {e}")))?,
            None => None,
        };
        let label_dim = labels.as_ref().map_or(0, |l| l.iter().max().map_or(0, |m| m + 1));
        let name = path.file_stem().map_or("dataset".into(), |s| s.to_string_lossy().to_string());
        let mut ds = Self { source, shape: [0; 3], labels, label_dim, name };
        let (_, shape) = ds.decode(0)?;
        ds.shape = shape;
        Ok(ds)
    }

    /// MNIST-style IDX files (optionally gzipped): images `[n, rows, cols]` and labels `[n]`.
    pub fn from_idx(images: &Path, labels: Option<&Path>, label_dim: usize) -> Result<Self, DataError> {
        let (dims, pixels) = read_idx(images)?;
        if dims.len() != 3 {
            return Err(err(images, format!("expected 3-D image data [n, rows, cols], found {dims:?}")));
        }
        let n = dims[0];
        let labels = match labels {
            Some(p) => {
                let (ldims, l) = read_idx(p)?;
                if ldims != [n] {
                    return Err(err(p, format!("expected {n} labels, found shape {ldims:?}")));
                }
                if let Some(bad) = l.iter().find(|&&v| v as usize >= label_dim) {
                    return Err(err(p, format!("label {bad} is out of range for {label_dim} classes")));
                }
                Some(l.into_iter().map(usize::from).collect())
            }
            None => None,
        };
        let label_dim = if labels.is_some() { label_dim } else { 0 };
        let name = images.file_name().map_or("idx".into(), |s| s.to_string_lossy().to_string());
        Ok(Self { source: Source::Memory(pixels), shape: [1, dims[1], dims[2]], labels, label_dim, name })
    }

    /// Images already in memory (CHW uint8, concatenated).
    pub fn from_memory(name: &str, pixels: Vec<u8>, shape: [usize; 3], labels: Option<Vec<usize>>, label_dim: usize) -> Self {
        Self { source: Source::Memory(pixels), shape, labels, label_dim, name: name.into() }
    }

    pub fn len(&self) -> usize {
        match &self.source {
            Source::Memory(p) => p.len() / self.shape.iter().product::<usize>(),
            Source::Folder(_, n) | Source::Zip(_, _, n) => n.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn label(&self, i: usize) -> Option<usize> {
        self.labels.as_ref().map(|l| l[i])
    }

    fn decode(&self, i: usize) -> Result<(Vec<u8>, [usize; 3]), DataError> {
        match &self.source {
            Source::Memory(p) => {
                let sz: usize = self.shape.iter().product();
                Ok((p[i * sz..(i + 1) * sz].to_vec(), self.shape))
            }
            Source::Folder(root, names) => {
                let path = root.join(&names[i]);
                let bytes = std::fs::read(&path).map_err(|e| err(&path, e))?;
                decode_image(&bytes, &names[i]).map_err(|m| err(root, m))
            }
            Source::Zip(path, zip, names) => {
                let mut zip = zip.lock().expect("zip lock");
                let mut f = zip.by_name(&names[i]).map_err(|e| err(path, format!("{}: {e}", names[i])))?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(|e| err(path, format!("{}: {e}", names[i])))?;
                decode_image(&bytes, &names[i]).map_err(|m| err(path, m))
            }
        }
    }

    /// Image `i`, CHW uint8. An image of another shape than the first is an error.
    pub fn image(&self, i: usize) -> Result<Vec<u8>, DataError> {
        let (px, shape) = self.decode(i)?;
        if shape != self.shape {
            return Err(err(&self.name, format!("image {i} has shape {shape:?}, the dataset's first image {:?}", self.shape)));
        }
        Ok(px)
    }
}

/// EDM's conversion to the network's space: x / 127.5 - 1.
pub fn to_model_space(px: &[u8]) -> Vec<f32> {
    px.iter().map(|&v| v as f32 / 127.5 - 1.0).collect()
}

/// EDM's conversion back to pixels: (x * 127.5 + 128).clip(0, 255) as uint8.
pub fn to_pixels(x: &[f32]) -> Vec<u8> {
    x.iter().map(|&v| (v * 127.5 + 128.0).clamp(0.0, 255.0) as u8).collect()
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// `{"labels": [["00000/img00000000.png", 6], ...]}` (or `null`) in EDM's `dataset.json`.
fn parse_labels(text: &str, names: &[String]) -> Result<Option<Vec<usize>>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Some(list) = v.get("labels") else { return Ok(None) };
    if list.is_null() {
        return Ok(None);
    }
    let list = list.as_array().ok_or("`labels` must be a list of [file, label] pairs")?;
    let mut map = std::collections::HashMap::new();
    for item in list {
        let pair = item.as_array().filter(|a| a.len() == 2).ok_or_else(|| format!("bad entry {item}: expected [file, label]"))?;
        let fname = pair[0].as_str().ok_or_else(|| format!("bad file name in {item}"))?;
        let label = pair[1].as_u64().ok_or_else(|| format!("bad label in {item}: expected a non-negative integer"))?;
        map.insert(fname.replace('\\', "/"), label as usize);
    }
    names
        .iter()
        .map(|n| map.get(n).copied().ok_or_else(|| format!("no label for {n}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Reads an IDX file (`.gz` or raw): dims and uint8 data.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let raw = std::fs::read(path).map_err(|e| err(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| err(path, format!("corrupt gzip: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(err(path, "not an IDX file of unsigned bytes (bad magic number)"));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() != header + n {
        return Err(err(path, format!("IDX data has {} bytes, dims {dims:?} need {n}", bytes.len() - header)));
    }
    Ok((dims, bytes[header..].to_vec()))
}
