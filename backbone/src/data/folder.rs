//! A folder of images per class: `root/<class>/<image>.{png,jpg,jpeg}`. Classes are the
//! sub-folder names in sorted order; all images become RGB at one size.

use std::path::Path;

use super::ImageDataset;
use crate::error::{BackboneError, Result};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Loads every image under `root`. With `size = Some((w, h))` images are resized to it;
/// otherwise all must share the size of the first one (a different one is an error naming it).
pub fn load_image_folder(root: &Path, size: Option<(u32, u32)>) -> Result<ImageDataset> {
    let mut classes: Vec<String> = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| BackboneError::io(root, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| BackboneError::io(root, e))?;
        if entry.path().is_dir() {
            classes.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(BackboneError::data(root, None, "no class sub-folders"));
    }
    let mut ds = ImageDataset {
        height: 0,
        width: 0,
        channels: 3,
        pixels: Vec::new(),
        labels: Vec::new(),
        classes: classes.clone(),
        source: root.to_path_buf(),
    };
    let mut want = size;
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| BackboneError::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for path in files {
            if !is_image(&path) {
                return Err(BackboneError::data(
                    &path,
                    None,
                    "not a .png/.jpg/.jpeg file inside a class folder",
                ));
            }
            let img =
                image::open(&path).map_err(|e| BackboneError::data(&path, None, e.to_string()))?;
            let mut rgb = img.to_rgb8();
            let (w, h) = *want.get_or_insert((rgb.width(), rgb.height()));
            if (rgb.width(), rgb.height()) != (w, h) {
                if size.is_none() {
                    return Err(BackboneError::data(
                        &path,
                        None,
                        format!(
                            "image is {}x{}, the others are {w}x{h} (pass a size to resize)",
                            rgb.width(),
                            rgb.height()
                        ),
                    ));
                }
                rgb = image::imageops::resize(&rgb, w, h, image::imageops::FilterType::Triangle);
            }
            ds.width = w as usize;
            ds.height = h as usize;
            ds.pixels.extend_from_slice(rgb.as_raw());
            ds.labels.push(label as u32);
        }
    }
    if ds.is_empty() {
        return Err(BackboneError::data(
            root,
            None,
            "no images in the class folders",
        ));
    }
    Ok(ds)
}
