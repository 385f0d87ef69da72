//! Named dense f32 tensors: the global adapter and client deltas as the aggregator sees them.
//!
//! The wire format may carry f16, int8 or top-k sparse tensors; they are decoded into these dense
//! f32 tensors before they reach the round state machine, so every strategy does its arithmetic in
//! one representation.

use serde::{Deserialize, Serialize};

/// One named trainable tensor (row-major).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor, checking that `data` holds exactly `shape.product()` values.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Tensor, ShapeError> {
        let name = name.into();
        let expected = numel(&shape);
        if expected != data.len() {
            return Err(ShapeError::Length {
                name,
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor { name, shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(name: impl Into<String>, shape: Vec<u32>) -> Tensor {
        let n = numel(&shape);
        Tensor {
            name: name.into(),
            shape,
            data: vec![0.0; n],
        }
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[u32]) -> usize {
    shape.iter().map(|&d| d as usize).product()
}

/// The trainable tensors of a PEFT tail, in a fixed order (the order of the global adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Adapter {
    pub tensors: Vec<Tensor>,
}

/// A tensor list that does not match the global adapter's layout.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    #[error("tensor `{name}`: shape holds {expected} values but data has {got}")]
    Length {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("expected {expected} tensors, got {got}")]
    Count { expected: usize, got: usize },
    #[error("tensor #{index}: expected `{expected}`, got `{got}`")]
    Name {
        index: usize,
        expected: String,
        got: String,
    },
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        name: String,
        expected: Vec<u32>,
        got: Vec<u32>,
    },
}

impl Adapter {
    pub fn new(tensors: Vec<Tensor>) -> Adapter {
        Adapter { tensors }
    }

    /// Total number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// An adapter with this layout and every value zero.
    pub fn zeros_like(&self) -> Adapter {
        Adapter {
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor::zeros(t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// Checks that `other` has the same tensor names, order, shapes and lengths.
    pub fn check_layout(&self, other: &[Tensor]) -> Result<(), ShapeError> {
        if self.tensors.len() != other.len() {
            return Err(ShapeError::Count {
                expected: self.tensors.len(),
                got: other.len(),
            });
        }
        for (index, (mine, theirs)) in self.tensors.iter().zip(other).enumerate() {
            if mine.name != theirs.name {
                return Err(ShapeError::Name {
                    index,
                    expected: mine.name.clone(),
                    got: theirs.name.clone(),
                });
            }
            if mine.shape != theirs.shape {
                return Err(ShapeError::Shape {
                    name: mine.name.clone(),
                    expected: mine.shape.clone(),
                    got: theirs.shape.clone(),
                });
            }
            if theirs.data.len() != numel(&theirs.shape) {
                return Err(ShapeError::Length {
                    name: theirs.name.clone(),
                    expected: numel(&theirs.shape),
                    got: theirs.data.len(),
                });
            }
        }
        Ok(())
    }

    /// All values, tensor after tensor.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.tensors.iter().flat_map(|t| t.data.iter().copied())
    }

    /// L2 norm over every value of every tensor (accumulated in f64).
    pub fn l2_norm(&self) -> f64 {
        l2_norm(&self.tensors)
    }
}

/// L2 norm over every value of a tensor list (accumulated in f64).
pub fn l2_norm(tensors: &[Tensor]) -> f64 {
    tensors
        .iter()
        .flat_map(|t| t.data.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// The first non-finite value in a tensor list, as (tensor name, flat index).
pub fn first_non_finite(tensors: &[Tensor]) -> Option<(&str, usize)> {
    tensors.iter().find_map(|t| {
        t.data
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (t.name.as_str(), i))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> Adapter {
        Adapter::new(vec![
            Tensor::new("a", vec![2], vec![1.0, 2.0]).unwrap(),
            Tensor::new("b", vec![1, 2], vec![2.0, 4.0]).unwrap(),
        ])
    }

    #[test]
    fn tensor_with_wrong_data_length_is_an_error_naming_it() {
        let err = Tensor::new("w", vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("`w`"), "{err}");
    }

    #[test]
    fn layout_check_names_the_first_mismatch() {
        let g = adapter();
        let mut other = g.tensors.clone();
        other[1].shape = vec![2, 1];
        let err = g.check_layout(&other).unwrap_err();
        assert!(matches!(err, ShapeError::Shape { ref name, .. } if name == "b"));
        other[1].name = "c".into();
        assert!(matches!(
            g.check_layout(&other),
            Err(ShapeError::Name { index: 1, .. })
        ));
        assert!(matches!(
            g.check_layout(&other[..1]),
            Err(ShapeError::Count {
                expected: 2,
                got: 1
            })
        ));
        assert!(g.check_layout(&g.tensors).is_ok());
    }

    #[test]
    fn norm_and_non_finite_scan_cover_every_tensor() {
        let mut g = adapter();
        assert!((g.l2_norm() - 25.0f64.sqrt()).abs() < 1e-12);
        assert_eq!(first_non_finite(&g.tensors), None);
        g.tensors[1].data[1] = f32::INFINITY;
        assert_eq!(first_non_finite(&g.tensors), Some(("b", 1)));
    }
}
