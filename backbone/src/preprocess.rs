//! Preprocessing as a backbone's manifest prescribes. Images ([`ImagePreprocess`]): bilinear
//! resize (half-pixel centres, no antialiasing — PyTorch's `F.interpolate(mode="bilinear",
//! align_corners=False)`), grey repeated to 3 channels, `(x * scale - mean) / std` per channel,
//! layout `[B, 3, S, S]`. Text ([`TextPreprocess`]): WordPiece ids and mask at a fixed length.

use ndarray::{Array2, Array4};

use crate::data::{ImageDataset, TextDataset};
use crate::error::{BackboneError, Result};
use crate::manifest::{Backbone, InputSpec, Manifest};
use crate::tokenizer::WordPiece;

/// The preprocessing of one vision backbone at one image size.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocess {
    pub size: usize,
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImagePreprocess {
    /// From a manifest; `size` defaults to the manifest's `default_size`.
    pub fn from_manifest(m: &Manifest, size: Option<usize>) -> Result<Self> {
        match &m.input {
            InputSpec::Image {
                default_size,
                scale,
                mean,
                std,
                ..
            } => Ok(Self {
                size: size.unwrap_or(*default_size),
                scale: *scale,
                mean: *mean,
                std: *std,
            }),
            InputSpec::Text { .. } => Err(BackboneError::Input(format!(
                "{} is a text backbone: no image preprocessing",
                m.id
            ))),
        }
    }

    /// A stable description, part of activation-cache keys.
    pub fn fingerprint(&self) -> String {
        format!(
            "bilinear-halfpixel size={} scale={:e} mean={:?} std={:?} grey=repeat",
            self.size, self.scale, self.mean, self.std
        )
    }

    /// Preprocesses the given samples of a data set into one batch.
    pub fn batch(&self, ds: &ImageDataset, indices: &[usize]) -> Result<Array4<f32>> {
        if ds.channels != 1 && ds.channels != 3 {
            return Err(BackboneError::data(
                &ds.source,
                None,
                format!("{} channels; expected 1 or 3", ds.channels),
            ));
        }
        let s = self.size;
        let mut out = Array4::<f32>::zeros((indices.len(), 3, s, s));
        let ys = axis_weights(ds.height, s);
        let xs = axis_weights(ds.width, s);
        let mut plane = vec![0f32; ds.height * ds.width];
        for (b, &i) in indices.iter().enumerate() {
            if i >= ds.len() {
                return Err(BackboneError::data(
                    &ds.source,
                    Some(i),
                    format!("index outside the {} samples", ds.len()),
                ));
            }
            let img = ds.image(i);
            for c in 0..3 {
                let src_c = if ds.channels == 1 { 0 } else { c };
                for (p, v) in plane.iter_mut().enumerate() {
                    *v = img[p * ds.channels + src_c] as f32 * self.scale;
                }
                let (m, sd) = (self.mean[c], self.std[c]);
                let mut dst = out.slice_mut(ndarray::s![b, c, .., ..]);
                for (oy, &(y0, y1, wy)) in ys.iter().enumerate() {
                    for (ox, &(x0, x1, wx)) in xs.iter().enumerate() {
                        let w = ds.width;
                        let top = (1.0 - wx) * plane[y0 * w + x0] + wx * plane[y0 * w + x1];
                        let bot = (1.0 - wx) * plane[y1 * w + x0] + wx * plane[y1 * w + x1];
                        let v = (1.0 - wy) * top + wy * bot;
                        dst[[oy, ox]] = (v - m) / sd;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// For each output coordinate: the two source coordinates and the weight of the second,
/// exactly as PyTorch computes them (source index clamped at 0 from below).
fn axis_weights(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// The tokenization of one text backbone at one sequence length: WordPiece as the manifest
/// prescribes, `[CLS] … [SEP]`, truncated and always padded to `max_len`, so every cached
/// activation row has the same shape `[max_len, hidden]`.
#[derive(Debug, Clone)]
pub struct TextPreprocess {
    pub max_len: usize,
    tokenizer: WordPiece,
    vocab_sha256: String,
    lowercase: bool,
    strip_accents: bool,
}

impl TextPreprocess {
    /// From a text backbone; `max_len` defaults to the manifest's `max_len` and must be in
    /// `2..=max_position`.
    pub fn from_backbone(backbone: &Backbone, max_len: Option<usize>) -> Result<Self> {
        let m = &backbone.manifest;
        let InputSpec::Text {
            vocab,
            lowercase,
            strip_accents,
            max_len: default_len,
            max_position,
            ..
        } = &m.input
        else {
            return Err(BackboneError::Input(format!(
                "{} is a vision backbone: no text preprocessing",
                m.id
            )));
        };
        let max_len = max_len.unwrap_or(*default_len);
        if !(2..=*max_position).contains(&max_len) {
            return Err(BackboneError::Input(format!(
                "{}: sequence length {max_len} is not in 2..={max_position}",
                m.id
            )));
        }
        let path = backbone.dir.join(vocab);
        let tokenizer = WordPiece::from_vocab_file(&path, *lowercase, *strip_accents)?;
        Ok(Self {
            max_len,
            tokenizer,
            vocab_sha256: m.files.get(vocab).cloned().unwrap_or_default(),
            lowercase: *lowercase,
            strip_accents: *strip_accents,
        })
    }

    /// A stable description, part of activation-cache keys: the vocabulary (by its sha256, so
    /// the key does not depend on where the backbone is), the tokenizer settings and the
    /// sequence length.
    pub fn fingerprint(&self) -> String {
        format!(
            "wordpiece vocab-sha256={} size={} lower={} strip={} max_len={} pad=max_len",
            self.vocab_sha256,
            self.tokenizer.vocab_size(),
            self.lowercase,
            self.strip_accents,
            self.max_len
        )
    }

    /// Token ids and attention mask `[B, max_len]` of the given samples, in that order.
    pub fn batch(&self, ds: &TextDataset, indices: &[usize]) -> Result<(Array2<i64>, Array2<i64>)> {
        let mut ids = Array2::from_elem((indices.len(), self.max_len), self.tokenizer.pad_id());
        let mut mask = Array2::zeros((indices.len(), self.max_len));
        for (b, &i) in indices.iter().enumerate() {
            let text = ds.texts.get(i).ok_or_else(|| {
                BackboneError::data(
                    &ds.source,
                    Some(i),
                    format!("index outside the {} samples", ds.len()),
                )
            })?;
            let e = self.tokenizer.encode(text, self.max_len);
            for (j, &id) in e.ids.iter().enumerate() {
                ids[[b, j]] = id;
                mask[[b, j]] = 1;
            }
        }
        Ok((ids, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn grey(h: usize, w: usize, pixels: Vec<u8>) -> ImageDataset {
        ImageDataset {
            height: h,
            width: w,
            channels: 1,
            pixels,
            labels: vec![0],
            classes: vec!["x".into()],
            source: PathBuf::from("test"),
        }
    }

    #[test]
    fn resize_of_a_constant_image_is_constant_and_normalised_per_channel() {
        let ds = grey(4, 4, vec![51; 16]);
        let p = ImagePreprocess {
            size: 10,
            scale: 1.0 / 255.0,
            mean: [0.1, 0.2, 0.3],
            std: [0.5, 0.25, 0.1],
        };
        let x = p.batch(&ds, &[0]).unwrap();
        assert_eq!(x.shape(), &[1, 3, 10, 10]);
        for c in 0..3 {
            let want = (0.2 - p.mean[c]) / p.std[c];
            for v in x.slice(ndarray::s![0, c, .., ..]) {
                assert!((v - want).abs() < 1e-6, "{v} vs {want}");
            }
        }
    }

    #[test]
    fn upsampling_two_pixels_matches_pytorch_half_pixel_bilinear() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 255.]]]]), size=(1, 4),
        //     mode="bilinear", align_corners=False) -> [0, 63.75, 191.25, 255]
        let ds = grey(1, 2, vec![0, 255]);
        let p = ImagePreprocess {
            size: 4,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let x = p.batch(&ds, &[0]).unwrap();
        let row: Vec<f32> = x.slice(ndarray::s![0, 0, 0, ..]).to_vec();
        assert_eq!(row, vec![0.0, 63.75, 191.25, 255.0]);
    }

    #[test]
    fn an_index_past_the_end_is_an_error_not_a_panic() {
        let ds = grey(2, 2, vec![0; 4]);
        let p = ImagePreprocess {
            size: 4,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        assert!(matches!(
            p.batch(&ds, &[3]),
            Err(BackboneError::Data { .. })
        ));
    }
}
