//! The global adapter and client deltas as the aggregator sees them: lists of dense f32
//! [`NamedTensor`]s (fedpeft-peft's, the type the tail's trainable parameters come out as).
//!
//! The wire format may carry f16, int8 or top-k sparse tensors with `u32` shapes; they are
//! decoded into these dense f32 tensors before they reach the round state machine, so every
//! strategy does its arithmetic in one representation.

use fedpeft_peft::NamedTensor;
use serde::{Deserialize, Serialize};

/// The trainable tensors of a PEFT tail, in a fixed order (the order of the global adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Adapter {
    pub tensors: Vec<NamedTensor>,
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
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

impl Adapter {
    pub fn new(tensors: Vec<NamedTensor>) -> Adapter {
        Adapter { tensors }
    }

    /// Total number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// An adapter with this layout and every value zero.
    pub fn zeros_like(&self) -> Adapter {
        Adapter {
            tensors: self
                .tensors
                .iter()
                .map(|t| NamedTensor::zeros(t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// Checks that `other` has the same tensor names, order, shapes and lengths.
    pub fn check_layout(&self, other: &[NamedTensor]) -> Result<(), ShapeError> {
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
            if theirs.values.len() != theirs.numel() {
                return Err(ShapeError::Length {
                    name: theirs.name.clone(),
                    expected: theirs.numel(),
                    got: theirs.values.len(),
                });
            }
        }
        Ok(())
    }

    /// All values, tensor after tensor.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.tensors.iter().flat_map(|t| t.values.iter().copied())
    }

    /// L2 norm over every value of every tensor (accumulated in f64).
    pub fn l2_norm(&self) -> f64 {
        l2_norm(&self.tensors)
    }
}

/// L2 norm over every value of a tensor list (accumulated in f64).
pub fn l2_norm(tensors: &[NamedTensor]) -> f64 {
    tensors
        .iter()
        .flat_map(|t| t.values.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// The first non-finite value in a tensor list, as (tensor name, flat index).
pub fn first_non_finite(tensors: &[NamedTensor]) -> Option<(&str, usize)> {
    tensors.iter().find_map(|t| {
        t.values
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
            NamedTensor::new("a", vec![2], vec![1.0, 2.0]).unwrap(),
            NamedTensor::new("b", vec![1, 2], vec![2.0, 4.0]).unwrap(),
        ])
    }

    #[test]
    fn tensor_with_wrong_data_length_is_an_error_naming_it() {
        let err = NamedTensor::new("w", vec![2, 3], vec![0.0; 5]).unwrap_err();
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
        g.tensors[1].values[1] = f32::INFINITY;
        assert_eq!(first_non_finite(&g.tensors), Some(("b", 1)));
    }
}
