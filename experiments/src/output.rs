//! Writing generated images: a safetensors file (`images` [N, C, H, W] float32 in [-1, 1],
//! unclamped), a folder of PNGs (EDM's conversion), a PNG grid, or for 2-D toy points a
//! scatter plot.

use anyhow::{bail, Context, Result};
use dmd_datasets::to_pixels;
use dmd_models::weights::write_atomic;
use dmd_models::{HostTensor, NamedTensors};
use std::path::Path;

/// Where `dmd sample` (and friends) put their images, decided by the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutKind {
    Safetensors,
    Grid,
    Folder,
}

impl OutKind {
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) {
            Some(e) if e == "safetensors" => Self::Safetensors,
            Some(e) if e == "png" => Self::Grid,
            _ => Self::Folder,
        }
    }
}

/// True for 2-D toy data stored as [N, 2, 1, 1].
pub fn is_points(images: &HostTensor) -> bool {
    images.shape.len() == 4 && images.shape[2] == 1 && images.shape[3] == 1
}

/// Writes `images` [N, C, H, W] to `out`; `names` gives the file stem of each image in a folder.
pub fn write_images(out: &Path, images: &HostTensor, labels: Option<&HostTensor>, names: &[String]) -> Result<()> {
    match OutKind::of(out) {
        OutKind::Safetensors => {
            let mut nt = NamedTensors::default();
            nt.insert("images", images.clone());
            if let Some(l) = labels {
                nt.insert("labels", l.clone());
            }
            nt.write(out)?;
        }
        OutKind::Grid => {
            let png = if is_points(images) { scatter_png(&[(images, [20, 60, 200])], 512)? } else { grid_png(images)? };
            write_atomic(out, &png).with_context(|| out.display().to_string())?;
        }
        OutKind::Folder => {
            if is_points(images) {
                bail!("{}: 2-D points cannot be written as one PNG each; use a .safetensors file or a .png scatter plot", out.display());
            }
            std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
            let [n, c, h, w] = dims4(images);
            let sz = c * h * w;
            for i in 0..n {
                let px = to_pixels(&images.data[i * sz..(i + 1) * sz]);
                let png = encode_png(&px, c, h, w)?;
                let path = out.join(format!("{}.png", names[i]));
                write_atomic(&path, &png).with_context(|| path.display().to_string())?;
            }
        }
    }
    Ok(())
}

fn dims4(t: &HostTensor) -> [usize; 4] {
    [t.shape[0], t.shape[1], t.shape[2], t.shape[3]]
}

/// CHW uint8 to PNG bytes (1 channel: grayscale, 3: RGB).
pub fn encode_png(chw: &[u8], c: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let (color, hwc) = match c {
        1 => (image::ExtendedColorType::L8, chw.to_vec()),
        3 => {
            let mut hwc = vec![0u8; 3 * h * w];
            for ch in 0..3 {
                for p in 0..h * w {
                    hwc[p * 3 + ch] = chw[ch * h * w + p];
                }
            }
            (image::ExtendedColorType::Rgb8, hwc)
        }
        _ => bail!("cannot write {c}-channel images as PNG (1 or 3 channels)"),
    };
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf).write_image(&hwc, w as u32, h as u32, color)?;
    Ok(buf)
}

/// A near-square grid of the images, in order, row by row.
pub fn grid_png(images: &HostTensor) -> Result<Vec<u8>> {
    let n = images.shape[0];
    grid_png_cols(images, (n as f64).sqrt().ceil() as usize)
}

/// A PNG grid with `gw` images per row, filled row by row.
pub fn grid_png_cols(images: &HostTensor, gw: usize) -> Result<Vec<u8>> {
    let [n, c, h, w] = dims4(images);
    let gw = gw.max(1);
    let gh = n.div_ceil(gw);
    let (gh_px, gw_px) = (gh * h, gw * w);
    let mut canvas = vec![0u8; c * gh_px * gw_px];
    let sz = c * h * w;
    for i in 0..n {
        let px = to_pixels(&images.data[i * sz..(i + 1) * sz]);
        let (gy, gx) = (i / gw, i % gw);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    canvas[ch * gh_px * gw_px + (gy * h + y) * gw_px + gx * w + x] = px[ch * h * w + y * w + x];
                }
            }
        }
    }
    encode_png(&canvas, c, gh_px, gw_px)
}

/// A preview of samples: a scatter plot for 2-D points, a grid for images.
pub fn preview_png(samples: &HostTensor) -> Result<Vec<u8>> {
    if is_points(samples) {
        scatter_png(&[(samples, [20, 60, 200])], 512)
    } else {
        grid_png(samples)
    }
}

/// Scatter plot of 2-D point sets over [-1.5, 1.5]^2, each set in its colour.
pub fn scatter_png(sets: &[(&HostTensor, [u8; 3])], size: usize) -> Result<Vec<u8>> {
    let mut chw = vec![255u8; 3 * size * size];
    let plane = size * size;
    let to_px = |v: f32| ((v as f64 + 1.5) / 3.0 * size as f64).floor() as i64;
    // Axes through the origin, light grey.
    for i in 0..size {
        for (x, y) in [(i, size / 2), (size / 2, i)] {
            for ch in 0..3 {
                chw[ch * plane + y * size + x] = 220;
            }
        }
    }
    for (points, colour) in sets {
        for p in points.data.chunks_exact(2) {
            let (x, y) = (to_px(p[0]), size as i64 - 1 - to_px(p[1]));
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (xx, yy) = (x + dx, y + dy);
                    if (0..size as i64).contains(&xx) && (0..size as i64).contains(&yy) {
                        for ch in 0..3 {
                            chw[ch * plane + yy as usize * size + xx as usize] = colour[ch];
                        }
                    }
                }
            }
        }
    }
    encode_png(&chw, 3, size, size)
}
