//! Datasets: EDM's format (folder and zip of PNGs with dataset.json), IDX files, and the
//! errors a corrupt dataset gives.

mod common;

use common::scratch;
use dmd_datasets::{to_model_space, ImageDataset};
use std::io::Write;
use std::path::Path;

fn write_png(path: &Path, w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed.wrapping_add(x as u8), (y * 10) as u8, 200]));
    img.save(path).unwrap();
    // CHW
    let mut chw = vec![0u8; (3 * w * h) as usize];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * (w * h) as usize + i] = p[c];
        }
    }
    chw
}

#[test]
fn edm_folder_and_zip_with_labels() {
    let tmp = scratch("ds_edm");
    let folder = tmp.join("set");
    std::fs::create_dir_all(folder.join("00000")).unwrap();
    let mut pixels = Vec::new();
    for i in 0..3 {
        pixels.push(write_png(&folder.join(format!("00000/img{i:08}.png")), 8, 8, i as u8 * 40));
    }
    let labels = r#"{"labels": [["00000/img00000000.png", 2], ["00000/img00000001.png", 0], ["00000/img00000002.png", 5]]}"#;
    std::fs::write(folder.join("dataset.json"), labels).unwrap();

    let ds = ImageDataset::open(&folder).unwrap();
    assert_eq!((ds.len(), ds.shape, ds.label_dim), (3, [3, 8, 8], 6));
    assert_eq!((ds.label(0), ds.label(1), ds.label(2)), (Some(2), Some(0), Some(5)));
    assert_eq!(ds.image(1).unwrap(), pixels[1]);
    let x = to_model_space(&ds.image(0).unwrap());
    assert_eq!(x[0], pixels[0][0] as f32 / 127.5 - 1.0);

    // The same as a zip, as EDM's dataset_tool.py writes it.
    let zip_path = tmp.join("set.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for i in 0..3 {
        zip.start_file(format!("00000/img{i:08}.png"), opts).unwrap();
        zip.write_all(&std::fs::read(folder.join(format!("00000/img{i:08}.png"))).unwrap()).unwrap();
    }
    zip.start_file("dataset.json", opts).unwrap();
    zip.write_all(labels.as_bytes()).unwrap();
    zip.finish().unwrap();
    let dz = ImageDataset::open(&zip_path).unwrap();
    assert_eq!((dz.len(), dz.shape, dz.label(2)), (3, [3, 8, 8], Some(5)));
    assert_eq!(dz.image(2).unwrap(), pixels[2]);

    // A corrupt image names the dataset and the file, when the dataset is opened (its header
    // is read then); a missing label names the file.
    std::fs::write(folder.join("00000/img00000001.png"), b"garbage").unwrap();
    let err = ImageDataset::open(&folder).err().unwrap().to_string();
    assert!(err.contains("img00000001.png") && err.contains("decode"), "{err}");
    std::fs::write(folder.join("dataset.json"), r#"{"labels": [["00000/img00000000.png", 2]]}"#).unwrap();
    let err = ImageDataset::open(&folder).err().unwrap().to_string();
    assert!(err.contains("dataset.json") && err.contains("img00000001.png"), "{err}");
}

#[test]
fn idx_files_gzipped_or_raw() {
    let tmp = scratch("ds_idx");
    let (n, r, c) = (3usize, 4usize, 5usize);
    let mut images = vec![0, 0, 8, 3];
    for d in [n, r, c] {
        images.extend((d as u32).to_be_bytes());
    }
    let px: Vec<u8> = (0..n * r * c).map(|i| i as u8).collect();
    images.extend(&px);
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    labels.extend([7u8, 1, 9]);
    let gz = tmp.join("images.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(&images).unwrap();
    enc.finish().unwrap();
    std::fs::write(tmp.join("labels"), &labels).unwrap();
    let ds = ImageDataset::from_idx(&gz, Some(&tmp.join("labels")), 10).unwrap();
    assert_eq!((ds.len(), ds.shape, ds.label(2)), (3, [1, 4, 5], Some(9)));
    assert_eq!(ds.image(1).unwrap(), px[20..40].to_vec());
    // Truncated data is an error naming the file.
    std::fs::write(tmp.join("bad"), &images[..images.len() - 3]).unwrap();
    let err = ImageDataset::from_idx(&tmp.join("bad"), None, 10).err().unwrap().to_string();
    assert!(err.contains("bad") && err.contains("IDX"), "{err}");
}
