//! Frozen tail weights: from a `tail.safetensors` file or an in-memory name → array map.

use std::collections::HashMap;
use std::path::Path;

use ndarray::ArrayD;
use safetensors::{Dtype, SafeTensors};

use crate::error::{PeftError, Result};
use crate::params::{array_from_f32, check_len};
use crate::real::Real;

/// Frozen f32 tensors by name (PyTorch layout, row-major).
#[derive(Debug, Clone, Default)]
pub struct FrozenWeights {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    source: String,
}

impl FrozenWeights {
    /// An in-memory map `name → (shape, values)`.
    pub fn from_map(tensors: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<Self> {
        for (name, (shape, values)) in &tensors {
            check_len(name, shape, values.len())?;
        }
        Ok(Self {
            tensors,
            source: "the in-memory weight map".into(),
        })
    }

    /// Reads a safetensors file (all tensors must be F32).
    pub fn from_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| PeftError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut w = Self::from_safetensors_bytes(&bytes, &path.display().to_string())?;
        w.source = path.display().to_string();
        Ok(w)
    }

    /// Parses safetensors bytes; `label` names the origin in errors.
    pub fn from_safetensors_bytes(bytes: &[u8], label: &str) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| PeftError::SafeTensors {
            path: label.to_string(),
            why: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(PeftError::Dtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self {
            tensors,
            source: label.to_string(),
        })
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    /// Where these weights came from (for error messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A tensor converted to `T`, checked against `expected` (`None` entries match any size).
    pub fn get<T: Real>(&self, name: &str, expected: &[Option<usize>]) -> Result<ArrayD<T>> {
        let (shape, values) = self
            .tensors
            .get(name)
            .ok_or_else(|| PeftError::MissingWeight {
                name: name.to_string(),
                source_desc: self.source.clone(),
            })?;
        let ok = shape.len() == expected.len()
            && shape
                .iter()
                .zip(expected)
                .all(|(&s, e)| e.is_none_or(|e| e == s));
        if !ok {
            return Err(PeftError::Shape {
                name: name.to_string(),
                expected: expected.iter().map(|e| e.unwrap_or(0)).collect(),
                got: shape.clone(),
            });
        }
        array_from_f32(name, shape, values)
    }
}

/// Writes `tensors` (f32, row-major) to a safetensors file at `path`, with `metadata` in its
/// header (`__metadata__`), atomically (a temporary file renamed into place).
pub fn write_safetensors(
    path: &Path,
    tensors: &[crate::params::NamedTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| PeftError::SafeTensors {
                    path: path.display().to_string(),
                    why: format!("tensor `{}`: {e}", t.name),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let io = |source| PeftError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        PeftError::SafeTensors {
            path: tmp.display().to_string(),
            why: e.to_string(),
        }
    })?;
    // A weights file is for others to read, whatever mode the writer created it with.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}
