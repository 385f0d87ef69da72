//! A folder of images per class: `root/<class>/**/*.{png,jpg,jpeg}` (sub-folders of a class
//! folder are read too). Images of any size and colour type the `image` crate decodes (grey,
//! grey + alpha, RGB, RGBA, 8 or 16 bits) become 8-bit RGB at one size: alpha is dropped, a
//! JPEG's EXIF orientation is applied, and the format is read from the file's bytes, not its
//! name.
//!
//! Loading is all or nothing: a class folder outside the fleet's class list, a class folder
//! with no image, a file that is not an image, an unreadable or undecodable image are each an
//! error naming the folder or file. Hidden files and folders (`.name`) and the files operating
//! systems leave behind (`Thumbs.db`, `desktop.ini`) are skipped.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};

use super::ImageDataset;
use crate::error::{BackboneError, Result};

/// The file extensions read as images (any case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Deeper than this below a class folder is taken for a symlink loop.
const MAX_DEPTH: usize = 16;

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Entries nobody means as data: hidden ones and the operating systems' leftovers.
fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.eq_ignore_ascii_case("thumbs.db")
        || name.eq_ignore_ascii_case("desktop.ini")
}

/// The entries of `dir`, sorted by name, without the ignored ones.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| BackboneError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| BackboneError::io(dir, e))?;
        if !is_ignored(&entry.file_name().to_string_lossy()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The class names an image folder holds: its sub-folder names, sorted (byte order). The
/// default class list of a fleet whose held-out set is this folder.
pub fn image_folder_classes(root: &Path) -> Result<Vec<String>> {
    let mut classes = Vec::new();
    for path in entries(root)? {
        if path.is_dir() {
            classes.push(folder_name(&path)?);
        }
    }
    if classes.is_empty() {
        return Err(BackboneError::data(
            root,
            None,
            "no class folders in it (expected root/<class>/<image>.png|jpg)",
        ));
    }
    Ok(classes)
}

fn folder_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| BackboneError::data(path, None, "folder name is not UTF-8"))
}

/// The image files below a class folder, sorted, recursing into sub-folders; any other file is
/// an error when `strict` (a class folder), skipped otherwise (images to predict on).
fn image_files(dir: &Path, depth: usize, strict: bool, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(BackboneError::data(
            dir,
            None,
            format!("nested more than {MAX_DEPTH} folders deep (a symlink loop?)"),
        ));
    }
    for path in entries(dir)? {
        if path.is_dir() {
            image_files(&path, depth + 1, strict, out)?;
        } else if is_image(&path) {
            out.push(path);
        } else if strict {
            return Err(BackboneError::data(
                &path,
                None,
                "not a .png, .jpg or .jpeg file inside a class folder (move it out, or \
                 convert it)",
            ));
        }
    }
    Ok(())
}

/// Decodes one image (format from its bytes; EXIF orientation applied) as 8-bit RGB.
fn decode(path: &Path) -> Result<image::RgbImage> {
    let reader = ImageReader::open(path).map_err(|e| BackboneError::io(path, e))?;
    decode_from(reader, path)
}

fn decode_from<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    path: &Path,
) -> Result<image::RgbImage> {
    let undecodable = |e: image::ImageError| {
        BackboneError::data(path, None, format!("cannot decode the image: {e}"))
    };
    let mut reader = reader
        .with_guessed_format()
        .map_err(|e| BackboneError::io(path, e))?;
    // The `image` crate's default limits (512 MiB of decoded pixels) bound what a hostile file
    // can make it allocate.
    reader.limits(image::Limits::default());
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let orientation = decoder.orientation().map_err(undecodable)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(BackboneError::data(
            path,
            None,
            "the image is empty (0 pixels)",
        ));
    }
    Ok(img.to_rgb8())
}

/// Decodes one encoded image (PNG or JPEG, format read from the bytes) to `side × side` 8-bit
/// RGB, resized as [`load_image_files`] resizes; `name` says where the bytes came from in
/// errors (a request, an upload).
pub fn decode_image_bytes(bytes: &[u8], side: u32, name: &str) -> Result<Vec<u8>> {
    let path = Path::new(name);
    let mut rgb = decode_from(ImageReader::new(std::io::Cursor::new(bytes)), path)?;
    if (rgb.width(), rgb.height()) != (side, side) {
        rgb = image::imageops::resize(&rgb, side, side, image::imageops::FilterType::Triangle);
    }
    Ok(rgb.into_raw())
}

/// Loads every image under `root`.
///
/// `classes`: the fleet's class list; a class folder's label is its position in it, a folder
/// not in it is an error, and a class of the list may have no folder (a device need not hold
/// every class). Without it, the classes are [`image_folder_classes`].
///
/// `size = Some((w, h))`: every image is resized to it (triangle filter, aspect ratio not
/// kept), so a folder of camera photos takes `w × h × 3` bytes per image in memory. Without
/// it, all must share the size of the first one (a different one is an error naming it).
pub fn load_image_folder(
    root: &Path,
    classes: Option<&[String]>,
    size: Option<(u32, u32)>,
) -> Result<ImageDataset> {
    let found = image_folder_classes(root)?;
    let classes: Vec<String> = match classes {
        Some(list) => {
            if let Some(stray) = found.iter().find(|c| !list.contains(c)) {
                return Err(BackboneError::data(
                    root.join(stray),
                    None,
                    format!("class folder `{stray}` is not one of the fleet's classes {list:?}"),
                ));
            }
            list.to_vec()
        }
        None => found.clone(),
    };
    let mut ds = ImageDataset {
        height: 0,
        width: 0,
        channels: 3,
        pixels: Vec::new(),
        labels: Vec::new(),
        classes,
        source: root.to_path_buf(),
    };
    let mut want = size;
    for class in &found {
        let label = ds
            .classes
            .iter()
            .position(|c| c == class)
            .expect("checked above") as u32;
        let dir = root.join(class);
        let mut files = Vec::new();
        image_files(&dir, 0, true, &mut files)?;
        if files.is_empty() {
            return Err(BackboneError::data(
                &dir,
                None,
                "class folder with no image in it (remove it, or add its images)",
            ));
        }
        for path in files {
            let mut rgb = decode(&path)?;
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
            ds.labels.push(label);
        }
    }
    Ok(ds)
}

/// The images to predict on: each path a file, or a folder whose images are read (sorted,
/// recursing into sub-folders; other files there are skipped). Returned with the files in
/// order, every image resized to `side × side`, all labelled 0 (unlabelled). An undecodable
/// image, a named file that is not an image and a folder or list with no image are errors
/// naming the path.
pub fn load_image_files(paths: &[PathBuf], side: u32) -> Result<(ImageDataset, Vec<PathBuf>)> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = files.len();
            image_files(p, 0, false, &mut files)?;
            if files.len() == before {
                return Err(BackboneError::data(
                    p,
                    None,
                    "no .png, .jpg or .jpeg image in this folder",
                ));
            }
        } else if !p.exists() {
            return Err(BackboneError::data(p, None, "no such file or folder"));
        } else if is_image(p) {
            files.push(p.clone());
        } else {
            return Err(BackboneError::data(
                p,
                None,
                "not a .png, .jpg or .jpeg file",
            ));
        }
    }
    if files.is_empty() {
        return Err(BackboneError::data(
            Path::new("."),
            None,
            "no image given (name image files or folders)",
        ));
    }
    let s = side as usize;
    let mut ds = ImageDataset {
        height: s,
        width: s,
        channels: 3,
        pixels: Vec::with_capacity(files.len() * s * s * 3),
        labels: vec![0; files.len()],
        classes: Vec::new(),
        source: paths.first().cloned().unwrap_or_default(),
    };
    for path in &files {
        let mut rgb = decode(path)?;
        if (rgb.width(), rgb.height()) != (side, side) {
            rgb = image::imageops::resize(&rgb, side, side, image::imageops::FilterType::Triangle);
        }
        ds.pixels.extend_from_slice(rgb.as_raw());
    }
    Ok((ds, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_read_in_order_resized_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        image::RgbImage::from_pixel(6, 4, image::Rgb([1, 2, 3]))
            .save(sub.join("b.png"))
            .unwrap();
        image::RgbImage::from_pixel(3, 9, image::Rgb([9, 9, 9]))
            .save(dir.path().join("a.jpg"))
            .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let (ds, files) = load_image_files(&[dir.path().to_path_buf()], 5).unwrap();
        assert_eq!(files, [dir.path().join("a.jpg"), sub.join("b.png")]);
        assert_eq!((ds.len(), ds.width, ds.height), (2, 5, 5));
        assert_eq!(&ds.image(1)[..3], &[1, 2, 3]);
        std::fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
        let e = load_image_files(&[dir.path().to_path_buf()], 5).unwrap_err();
        assert!(e.to_string().contains("broken.png"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = load_image_files(&[empty.path().to_path_buf()], 5).unwrap_err();
        assert!(e.to_string().contains("no .png"), "{e}");
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// `root/<class>/<k>.png`, `n` solid images of 6×4 per class.
    fn folder(classes: &[&str], n: u8) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (c, class) in classes.iter().enumerate() {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for k in 0..n {
                image::RgbImage::from_pixel(6, 4, image::Rgb([c as u8 * 100, k, 0]))
                    .save(dir.path().join(class).join(format!("{k}.png")))
                    .unwrap();
            }
        }
        dir
    }

    #[test]
    fn labels_follow_the_fleet_list_not_the_folders_a_device_happens_to_have() {
        let dir = folder(&["dog", "bird"], 2);
        let fleet = names(&["cat", "dog", "bird"]);
        let ds = load_image_folder(dir.path(), Some(&fleet), Some((8, 8))).unwrap();
        assert_eq!(ds.classes, fleet);
        // bird (sorted first on disk) is class 2, dog class 1.
        assert_eq!(ds.labels, vec![2, 2, 1, 1]);
        assert_eq!((ds.width, ds.height, ds.channels), (8, 8, 3));
        // Without a list: the folders, sorted.
        let own = load_image_folder(dir.path(), None, None).unwrap();
        assert_eq!(own.classes, names(&["bird", "dog"]));
    }

    #[test]
    fn grey_rgba_and_sixteen_bit_images_in_nested_folders_become_rgb_and_hidden_files_are_skipped()
    {
        let dir = folder(&["a", "b"], 1);
        let nested = dir.path().join("a/2024/june");
        std::fs::create_dir_all(&nested).unwrap();
        image::GrayImage::from_pixel(3, 3, image::Luma([77]))
            .save(nested.join("grey.png"))
            .unwrap();
        image::RgbaImage::from_pixel(9, 5, image::Rgba([1, 2, 3, 0]))
            .save(dir.path().join("b/rgba.PNG"))
            .unwrap();
        image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(4, 4, image::Luma([65535u16]))
            .save(dir.path().join("b/deep.png"))
            .unwrap();
        // A PNG named .jpg decodes by its bytes.
        std::fs::copy(
            dir.path().join("a/0.png"),
            dir.path().join("b/misnamed.jpg"),
        )
        .unwrap();
        std::fs::write(dir.path().join("a/.DS_Store"), b"junk").unwrap();
        std::fs::write(dir.path().join("b/Thumbs.db"), b"junk").unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let ds = load_image_folder(dir.path(), None, Some((2, 2))).unwrap();
        assert_eq!(ds.classes, names(&["a", "b"]));
        assert_eq!(ds.len(), 6);
        // a/0.png, a/2024/june/grey.png, then b/0.png, deep.png, misnamed.jpg, rgba.PNG.
        let grey = ds.image(1);
        assert!(grey.iter().all(|&v| v == 77), "{grey:?}");
        assert_eq!(&ds.image(3)[..3], &[255, 255, 255], "16-bit white");
        assert_eq!(&ds.image(5)[..3], &[1, 2, 3], "alpha dropped");
        assert_eq!(ds.labels, vec![0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn a_class_outside_the_list_names_its_folder() {
        let dir = folder(&["cat", "zebra"], 1);
        let e = load_image_folder(dir.path(), Some(&names(&["cat", "dog"])), None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("zebra") && msg.contains("not one of"), "{msg}");
    }

    #[test]
    fn an_empty_class_folder_and_a_root_without_classes_are_errors_naming_them() {
        let dir = folder(&["cat"], 1);
        std::fs::create_dir(dir.path().join("dog")).unwrap();
        std::fs::write(dir.path().join("dog/.hidden.png"), b"x").unwrap();
        let msg = load_image_folder(dir.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dog") && msg.contains("no image"), "{msg}");
        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("README.txt"), b"x").unwrap();
        let msg = load_image_folder(empty.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no class folders"), "{msg}");
        let msg = load_image_folder(&empty.path().join("missing"), None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing"), "{msg}");
    }

    #[test]
    fn a_broken_image_or_a_stray_file_names_the_file_and_nothing_is_returned() {
        let dir = folder(&["cat", "dog"], 2);
        std::fs::write(dir.path().join("dog/1.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
        let e = load_image_folder(dir.path(), None, None).unwrap_err();
        assert!(matches!(e, BackboneError::Data { .. }), "{e}");
        assert!(
            e.to_string().contains("1.png") && e.to_string().contains("decode"),
            "{e}"
        );
        std::fs::write(dir.path().join("dog/1.png"), b"").unwrap();
        let e = load_image_folder(dir.path(), None, None).unwrap_err();
        assert!(e.to_string().contains("1.png"), "{e}");
        std::fs::remove_file(dir.path().join("dog/1.png")).unwrap();
        std::fs::write(dir.path().join("cat/notes.txt"), b"x").unwrap();
        let e = load_image_folder(dir.path(), None, None).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn an_unreadable_image_names_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = folder(&["cat", "dog"], 1);
        let path = dir.path().join("cat/0.png");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&path).is_ok() {
            return; // root reads anything: nothing to test
        }
        let e = load_image_folder(dir.path(), None, None).unwrap_err();
        assert!(matches!(e, BackboneError::Io { .. }), "{e}");
        assert!(e.to_string().contains("0.png"), "{e}");
    }

    #[test]
    fn a_jpeg_of_another_size_is_resized_and_without_a_size_it_is_refused() {
        let dir = folder(&["cat", "dog"], 1);
        image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10]))
            .save(dir.path().join("dog/big.jpg"))
            .unwrap();
        let ds = load_image_folder(dir.path(), None, Some((6, 4))).unwrap();
        assert_eq!(ds.len(), 3);
        let px = &ds.image(2)[..3];
        assert!(px[0] > 180 && px[1] < 40, "{px:?}");
        let e = load_image_folder(dir.path(), None, None).unwrap_err();
        assert!(e.to_string().contains("big.jpg"), "{e}");
    }
}
