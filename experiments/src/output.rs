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
    encode_png(&scatter_canvas(sets, size), 3, size, size)
}

/// [`scatter_png`]'s RGB canvas (CHW), before encoding.
pub fn scatter_canvas(sets: &[(&HostTensor, [u8; 3])], size: usize) -> Vec<u8> {
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
    chw
}

/// What `loss_curves_png` draws, for READMEs.
pub const LOSS_CURVES_HELP: &str = "\nLoss curves: one panel per logged loss (named top right), against the training step \
(0 at the left, the last step printed bottom right). The numbers at the top and bottom left of a panel are its y range; \
a panel whose values span more than a factor 30 is drawn on a log scale (marked `log`).\n";

/// Loss curves from a `metrics.jsonl` log: one panel per key present, stacked, each with its
/// y range (and the last step) printed in a small built-in digit font.
pub fn loss_curves_png(metrics: &Path, keys: &[&str]) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(metrics).with_context(|| metrics.display().to_string())?;
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let (names, series): (Vec<&str>, Vec<Vec<(f64, f64)>>) = keys
        .iter()
        .map(|k| (*k, lines.iter().filter_map(|v| Some((v["step"].as_f64()?, v[*k].as_f64()?))).filter(|(_, y)| y.is_finite()).collect::<Vec<_>>()))
        .filter(|(_, s)| !s.is_empty())
        .unzip();
    if series.is_empty() {
        bail!("{}: no losses logged", metrics.display());
    }
    let (w, ph) = (640usize, 150usize);
    let h = ph * series.len();
    let mut img = vec![255u8; 3 * h * w];
    let colours = [[31u8, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189], [255, 127, 14]];
    let max_step = series.iter().flat_map(|s| s.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let (left, right, top, bottom) = (70usize, 10usize, 12usize, 20usize);
    let put = |img: &mut [u8], x: usize, y: usize, c: [u8; 3]| {
        if x < w && y < h {
            for ch in 0..3 {
                img[ch * h * w + y * w + x] = c[ch];
            }
        }
    };
    for (k, s) in series.iter().enumerate() {
        let y0 = k * ph;
        let (lo, hi) = s.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let log = lo > 0.0 && hi / lo > 30.0;
        let tf = |v: f64| if log { v.log10() } else { v };
        let (tlo, thi) = (tf(lo), tf(hi).max(tf(lo) + 1e-12));
        let (pw, pph) = (w - left - right, ph - top - bottom);
        // Frame.
        for x in left..w - right {
            put(&mut img, x, y0 + top, [200, 200, 200]);
            put(&mut img, x, y0 + top + pph, [120, 120, 120]);
        }
        for y in y0 + top..=y0 + top + pph {
            put(&mut img, left, y, [120, 120, 120]);
        }
        let to_xy = |p: &(f64, f64)| {
            let x = left as f64 + p.0 / max_step * pw as f64;
            let y = (y0 + top) as f64 + (thi - tf(p.1)) / (thi - tlo) * pph as f64;
            (x, y)
        };
        for pair in s.windows(2) {
            let (a, b) = (to_xy(&pair[0]), to_xy(&pair[1]));
            let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
                put(&mut img, x.round() as usize, y.round() as usize, colours[k % colours.len()]);
                put(&mut img, x.round() as usize, y.round() as usize + 1, colours[k % colours.len()]);
            }
        }
        if s.len() == 1 {
            let (x, y) = to_xy(&s[0]);
            put(&mut img, x as usize, y as usize, colours[k % colours.len()]);
        }
        draw_text(&mut img, w, h, w - right - 8 * names[k].len() - 4, y0 + top + 4, names[k], colours[k % colours.len()]);
        draw_text(&mut img, w, h, 2, y0 + top, &fmt_num(hi), [0, 0, 0]);
        draw_text(&mut img, w, h, 2, y0 + top + pph - 10, &fmt_num(lo), [0, 0, 0]);
        if log {
            draw_text(&mut img, w, h, 2, y0 + top + pph / 2 - 5, "log", [90, 90, 90]);
        }
        let last = format!("{}", max_step as u64);
        draw_text(&mut img, w, h, w - right - 8 * last.len(), y0 + top + pph + 4, &last, [0, 0, 0]);
        draw_text(&mut img, w, h, left, y0 + top + pph + 4, "0", [0, 0, 0]);
    }
    encode_png(&img, 3, h, w)
}

fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Digits, lower-case letters, '.', '-', '+', '_' in a 3x5 font, drawn at twice the size.
fn draw_text(img: &mut [u8], w: usize, h: usize, x0: usize, y0: usize, text: &str, colour: [u8; 3]) {
    let glyph = |c: char| -> [u8; 5] {
        match c {
            '0' => [7, 5, 5, 5, 7],
            '1' => [2, 6, 2, 2, 7],
            '2' => [7, 1, 7, 4, 7],
            '3' => [7, 1, 7, 1, 7],
            '4' => [5, 5, 7, 1, 1],
            '5' => [7, 4, 7, 1, 7],
            '6' => [7, 4, 7, 5, 7],
            '7' => [7, 1, 1, 1, 1],
            '8' => [7, 5, 7, 5, 7],
            '9' => [7, 5, 7, 1, 7],
            '.' => [0, 0, 0, 0, 2],
            '-' => [0, 0, 7, 0, 0],
            '+' => [0, 2, 7, 2, 0],
            '_' => [0, 0, 0, 0, 7],
            'a' => [0, 3, 5, 5, 3],
            'b' => [4, 6, 5, 5, 6],
            'c' => [0, 3, 4, 4, 3],
            'd' => [1, 3, 5, 5, 3],
            'e' => [0, 7, 7, 4, 3],
            'f' => [3, 4, 6, 4, 4],
            'g' => [3, 5, 3, 1, 6],
            'h' => [4, 6, 5, 5, 5],
            'i' => [2, 0, 2, 2, 2],
            'j' => [1, 0, 1, 5, 2],
            'k' => [4, 5, 6, 5, 5],
            'l' => [6, 2, 2, 2, 7],
            'm' => [0, 7, 7, 5, 5],
            'n' => [0, 6, 5, 5, 5],
            'o' => [0, 2, 5, 5, 2],
            'p' => [0, 6, 5, 6, 4],
            'q' => [0, 3, 5, 3, 1],
            'r' => [0, 3, 4, 4, 4],
            's' => [0, 3, 6, 1, 6],
            't' => [2, 7, 2, 2, 1],
            'u' => [0, 5, 5, 5, 3],
            'v' => [0, 5, 5, 5, 2],
            'w' => [0, 5, 5, 7, 7],
            'x' => [0, 5, 2, 2, 5],
            'y' => [5, 5, 3, 1, 6],
            'z' => [0, 7, 2, 4, 7],
            _ => [0; 5],
        }
    };
    for (i, c) in text.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let (x, y) = (x0 + i * 8 + col * 2 + dx, y0 + row * 2 + dy);
                            if x < w && y < h {
                                for ch in 0..3 {
                                    img[ch * h * w + y * w + x] = colour[ch];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
