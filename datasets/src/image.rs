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
    Zip(PathBuf, Mutex<zip::ZipArchive<ReadBudget<File>>>, Vec<String>),
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
    let cannot = |e: &dyn std::fmt::Display| format!("{what}: cannot decode image: {e}");
    // The decoder allocates the pixels its header declares before reading them: allow what
    // the file can hold (deflate expands at most ~1032:1; low bit depths and palettes up to
    // 32x more), at least 16 MiB, so a small corrupt file cannot claim gigabytes.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((bytes.len() as u64).saturating_mul(4096).clamp(16 << 20, 512 << 20));
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| cannot(&e))?;
    reader.limits(limits);
    let img = reader.decode().map_err(|e| cannot(&e))?;
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
            let mut zip = open_zip(file).map_err(|e| err(path, format!("not a readable zip: {e}")))?;
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
        // The other images' sizes and channels from their headers, so that a file of another
        // shape, or one that is no image, is found now rather than mid-training.
        for i in 1..ds.len() {
            if let Some(shape) = ds.peek_shape(i)? {
                if shape != ds.shape {
                    return Err(ds.shape_mismatch(i, shape));
                }
            }
        }
        Ok(ds)
    }

    /// MNIST-style IDX files (optionally gzipped): images `[n, rows, cols]` and labels `[n]`.
    pub fn from_idx(images: &Path, labels: Option<&Path>, label_dim: usize) -> Result<Self, DataError> {
        let (dims, pixels) = read_idx(images)?;
        if dims.len() != 3 || dims[1] == 0 || dims[2] == 0 {
            return Err(err(images, format!("expected 3-D image data [n, rows, cols] with rows, cols > 0, found {dims:?}")));
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
            return Err(self.shape_mismatch(i, shape));
        }
        Ok(px)
    }

    fn shape_mismatch(&self, i: usize, shape: [usize; 3]) -> DataError {
        let msg = |what: &str| format!("{what} has shape {shape:?}, the dataset's first image {:?}", self.shape);
        match &self.source {
            Source::Memory(_) => err(&self.name, msg(&format!("image {i}"))),
            Source::Folder(root, names) => err(root, msg(&names[i])),
            Source::Zip(path, _, names) => err(path, msg(&names[i])),
        }
    }

    /// Image `i`'s [C, H, W] from the first bytes of its file (see [`header_shape`]).
    fn peek_shape(&self, i: usize) -> Result<Option<[usize; 3]>, DataError> {
        let mut head = Vec::with_capacity(32);
        match &self.source {
            Source::Memory(_) => Ok(Some(self.shape)),
            Source::Folder(root, names) => {
                let path = root.join(&names[i]);
                File::open(&path).and_then(|f| f.take(32).read_to_end(&mut head)).map_err(|e| err(&path, e))?;
                header_shape(&head, &names[i]).map_err(|m| err(root, m))
            }
            Source::Zip(path, zip, names) => {
                let mut zip = zip.lock().expect("zip lock");
                let f = zip.by_name(&names[i]).map_err(|e| err(path, format!("{}: {e}", names[i])))?;
                f.take(32).read_to_end(&mut head).map_err(|e| err(path, format!("{}: {e}", names[i])))?;
                header_shape(&head, &names[i]).map_err(|m| err(path, m))
            }
        }
    }
}

/// The [C, H, W] that [`decode_image`] will give, from an image file's first bytes: a PNG's
/// IHDR chunk; `None` for the other formats the decoder recognises (checked when decoded).
fn header_shape(head: &[u8], what: &str) -> Result<Option<[usize; 3]>, String> {
    if !head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return match image::guess_format(head) {
            Ok(_) => Ok(None),
            Err(e) => Err(format!("{what}: cannot decode image: {e}")),
        };
    }
    if head.len() < 26 || &head[12..16] != b"IHDR" {
        return Err(format!("{what}: cannot decode image: truncated or corrupt PNG header"));
    }
    let dim = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as usize;
    // Gray and gray + alpha decode to one channel, RGB, palette and RGBA to three.
    let c = match head[25] {
        0 | 4 => 1,
        2 | 3 | 6 => 3,
        t => return Err(format!("{what}: cannot decode image: PNG colour type {t} does not exist")),
    };
    Ok(Some([c, dim(20), dim(16)]))
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

/// Labels are class indices below this (the networks take one-hot vectors of that length).
const MAX_CLASSES: u64 = 1 << 24;

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
        if label >= MAX_CLASSES {
            return Err(format!("bad label in {item}: at most {MAX_CLASSES} classes are supported"));
        }
        map.insert(fname.replace('\\', "/"), label as usize);
    }
    names
        .iter()
        .map(|n| map.get(n).copied().ok_or_else(|| format!("no label for {n}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A reader that fails after `left` bytes (seeks are free); `u64::MAX` is no limit.
pub struct ReadBudget<R> {
    inner: R,
    left: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for ReadBudget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let left = self.left.load(Relaxed);
        if left == 0 && !buf.is_empty() {
            return Err(std::io::Error::other("read budget exhausted"));
        }
        let most = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..most])?;
        if left != u64::MAX {
            self.left.store(left - n as u64, Relaxed);
        }
        Ok(n)
    }
}

impl<R: std::io::Seek> std::io::Seek for ReadBudget<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Opens a zip archive (EDM's datasets, numpy's `.npz`) with bounded work. When the last end of
/// central directory record is bad, the zip crate tries every earlier "PK\x05\x06" in the file,
/// rescanning the file for each: a crafted file of a few hundred kilobytes keeps it busy for
/// minutes. So opening may read the file at most 4 times over (a good archive reads its end and
/// its central directory once); the entries are read without limit afterwards. The crate also
/// reserves memory for the entries the record declares, so that count is checked first against
/// the room its central directory has (46 bytes an entry at least).
pub fn open_zip(file: File) -> Result<zip::ZipArchive<ReadBudget<File>>, String> {
    use std::io::{Seek, SeekFrom};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let mut file = file;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    // The record lies in the last 22 + 65535 (comment) bytes.
    let tail_len = len.min(22 + 65535);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::End(-(tail_len as i64))).and_then(|_| file.read_exact(&mut tail)).map_err(|e| e.to_string())?;
    let at = (0..tail.len().saturating_sub(21)).rev().find(|&i| tail[i..].starts_with(b"PK\x05\x06")).ok_or("no end of central directory record")?;
    let u16_at = |b: &[u8], i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let u32_at = |b: &[u8], i: usize| u64::from(u32::from_le_bytes(b[i..i + 4].try_into().unwrap()));
    // (Entries on this disk and in all: the crate may take either.)
    let (mut entries, mut cd_size) = (u16_at(&tail, at + 8).max(u16_at(&tail, at + 10)), u32_at(&tail, at + 12));
    let mut known = true;
    if entries == 0xffff || cd_size == 0xffff_ffff || u32_at(&tail, at + 16) == 0xffff_ffff {
        // Zip64: the locator just before the record names the zip64 record (when it is not
        // where the locator says, as after prepended data, the crate is left to find it).
        if let Some(loc) = at.checked_sub(20).filter(|&l| tail[l..].starts_with(b"PK\x06\x07")) {
            known = false;
            let off = u32_at(&tail, loc + 8) | (u32_at(&tail, loc + 12) << 32);
            let mut rec = [0u8; 56];
            if off.checked_add(56).is_some_and(|end| end <= len) && file.seek(SeekFrom::Start(off)).and_then(|_| file.read_exact(&mut rec)).is_ok() && rec.starts_with(b"PK\x06\x06") {
                entries = (u32_at(&rec, 24) | (u32_at(&rec, 28) << 32)).max(u32_at(&rec, 32) | (u32_at(&rec, 36) << 32));
                cd_size = u32_at(&rec, 40) | (u32_at(&rec, 44) << 32);
                known = true;
            }
        }
    }
    if known && (cd_size > len || entries.saturating_mul(46) > cd_size) {
        return Err(format!("the archive declares {entries} entries in a central directory of {cd_size} bytes (file of {len} bytes)"));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let left = std::sync::Arc::new(AtomicU64::new(len.saturating_mul(4).saturating_add(1 << 20)));
    let zip = zip::ZipArchive::new(ReadBudget { inner: file, left: left.clone() }).map_err(|e| match left.load(Relaxed) {
        0 => "no valid central directory (gave up after reading the file 4 times over)".to_string(),
        _ => e.to_string(),
    })?;
    left.store(u64::MAX, Relaxed);
    Ok(zip)
}

/// Reads an IDX file (`.gz` or raw): dims and uint8 data.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let raw = std::fs::read(path).map_err(|e| err(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        // The header, then at most the data it declares and one byte more (which shows excess
        // data), and never more than deflate can expand the file to (about 1032:1): a small
        // file cannot make us inflate without bound.
        let corrupt = |e: std::io::Error| err(path, format!("corrupt gzip: {e}"));
        let mut gz = GzDecoder::new(&raw[..]);
        let mut out = Vec::new();
        (&mut gz).take(4).read_to_end(&mut out).map_err(corrupt)?;
        let ndim = out.get(3).map_or(0, |&d| u64::from(d));
        (&mut gz).take(4 * ndim).read_to_end(&mut out).map_err(corrupt)?;
        let declared = out.get(4..).unwrap_or_default().chunks_exact(4).try_fold(1u64, |n, d| n.checked_mul(u64::from(u32::from_be_bytes(d.try_into().unwrap()))));
        let most = (raw.len() as u64).saturating_mul(1100).saturating_add(1 << 20);
        (&mut gz).take(declared.map_or(0, |n| n.saturating_add(1)).min(most)).read_to_end(&mut out).map_err(corrupt)?;
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
    let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if n != Some(bytes.len() - header) {
        let need = n.map_or("more than 2^64".into(), |n| n.to_string());
        return Err(err(path, format!("IDX data has {} bytes, dims {dims:?} need {need}", bytes.len() - header)));
    }
    Ok((dims, bytes[header..].to_vec()))
}
