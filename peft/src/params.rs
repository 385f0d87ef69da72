//! Named tensors (frozen and trainable) and their gradients.
//!
//! Every tensor of a tail lives in one [`ParamStore`]; layers hold [`ParamId`]s into it. Whether
//! a tensor is trained is a flag on the store, so a PEFT method is just a choice of flags plus
//! the extra tensors it adds (LoRA factors, adapters, prompts). Insertion order is the stable
//! wire order of the trainable tensors.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayViewD, Ix1, Ix2, IxDyn, Zip};

use crate::error::{PeftError, Result};
use crate::real::Real;

/// Index of a tensor in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

/// One named tensor of a tail.
#[derive(Debug, Clone)]
pub struct Param<T> {
    /// Stable name (the wire name when trainable), e.g. `blocks.0.attn.q.lora_a`.
    pub name: String,
    /// The values, row-major.
    pub value: ArrayD<T>,
    /// Whether the PEFT method trains this tensor.
    pub trainable: bool,
}

/// All tensors of a tail, frozen and trainable, in a stable order.
#[derive(Debug, Clone, Default)]
pub struct ParamStore<T> {
    params: Vec<Param<T>>,
    index: HashMap<String, usize>,
}

impl<T: Real> ParamStore<T> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            params: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Adds a tensor; names must be unique.
    pub fn add(&mut self, name: &str, value: ArrayD<T>, trainable: bool) -> Result<ParamId> {
        if self.index.contains_key(name) {
            return Err(PeftError::Config {
                field: name.to_string(),
                why: "duplicate tensor name".into(),
            });
        }
        let id = self.params.len();
        self.params.push(Param {
            name: name.to_string(),
            value,
            trainable,
        });
        self.index.insert(name.to_string(), id);
        Ok(ParamId(id))
    }

    /// Looks a tensor up by name.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).map(|&i| ParamId(i))
    }

    /// The tensor with this id.
    pub fn param(&self, id: ParamId) -> &Param<T> {
        &self.params[id.0]
    }

    /// Mutable access to the tensor with this id.
    pub fn param_mut(&mut self, id: ParamId) -> &mut Param<T> {
        &mut self.params[id.0]
    }

    /// All tensors in stable order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param<T>)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Whether a tensor is trained.
    pub fn trainable(&self, id: ParamId) -> bool {
        self.params[id.0].trainable
    }

    /// Marks a tensor trained or frozen.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        self.params[id.0].trainable = trainable;
    }

    /// A 2-D view (a weight matrix).
    pub fn w2(&self, id: ParamId) -> ArrayView2<'_, T> {
        self.params[id.0]
            .value
            .view()
            .into_dimensionality::<Ix2>()
            .expect("weights are validated as 2-D when the tail is built")
    }

    /// A 1-D view (a bias or scale).
    pub fn w1(&self, id: ParamId) -> ArrayView1<'_, T> {
        self.params[id.0]
            .value
            .view()
            .into_dimensionality::<Ix1>()
            .expect("vectors are validated as 1-D when the tail is built")
    }

    /// Any-dimensional view.
    pub fn wd(&self, id: ParamId) -> ArrayViewD<'_, T> {
        self.params[id.0].value.view()
    }

    /// Total number of scalars in trainable tensors.
    pub fn num_trainable(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.value.len())
            .sum()
    }

    /// Total number of scalars in frozen tensors.
    pub fn num_frozen(&self) -> usize {
        self.params
            .iter()
            .filter(|p| !p.trainable)
            .map(|p| p.value.len())
            .sum()
    }

    /// Names of the trainable tensors, comma-separated (for error messages).
    pub(crate) fn trainable_names(&self) -> String {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Gradients for the trainable tensors of a [`ParamStore`] (`None` for frozen ones).
#[derive(Debug, Clone)]
pub struct Grads<T> {
    slots: Vec<Option<ArrayD<T>>>,
}

impl<T: Real> Grads<T> {
    /// Zero gradients shaped like the store's trainable tensors.
    pub fn zeros_like(store: &ParamStore<T>) -> Self {
        Self {
            slots: store
                .params
                .iter()
                .map(|p| p.trainable.then(|| ArrayD::zeros(p.value.raw_dim())))
                .collect(),
        }
    }

    /// Whether a gradient is wanted for this tensor.
    #[inline]
    pub fn wants(&self, id: ParamId) -> bool {
        self.slots[id.0].is_some()
    }

    /// The gradient of a trainable tensor.
    pub fn get(&self, id: ParamId) -> Option<&ArrayD<T>> {
        self.slots[id.0].as_ref()
    }

    /// Mutable gradient of a trainable tensor.
    pub fn get_mut(&mut self, id: ParamId) -> Option<&mut ArrayD<T>> {
        self.slots[id.0].as_mut()
    }

    /// Adds `g` (2-D) into the gradient of `id`, if it is trained.
    pub fn acc2(&mut self, id: ParamId, g: ArrayView2<'_, T>) {
        if let Some(slot) = self.slots[id.0].as_mut() {
            let mut s = slot.view_mut().into_dimensionality::<Ix2>().expect("2-D");
            s += &g;
        }
    }

    /// Adds `g` (1-D) into the gradient of `id`, if it is trained.
    pub fn acc1(&mut self, id: ParamId, g: ArrayView1<'_, T>) {
        if let Some(slot) = self.slots[id.0].as_mut() {
            let mut s = slot.view_mut().into_dimensionality::<Ix1>().expect("1-D");
            s += &g;
        }
    }

    /// Adds `g` (any shape matching the tensor) into the gradient of `id`.
    pub fn accd(&mut self, id: ParamId, g: ArrayViewD<'_, T>) {
        if let Some(slot) = self.slots[id.0].as_mut() {
            *slot += &g;
        }
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            s.fill(T::zero());
        }
    }

    /// Sum of squares of all gradients.
    pub fn sq_norm(&self) -> f64 {
        self.slots
            .iter()
            .flatten()
            .map(|g| g.iter().map(|&x| x.wide() * x.wide()).sum::<f64>())
            .sum()
    }

    /// `self += factor * other`.
    pub fn add_scaled(&mut self, other: &Grads<T>, factor: T) {
        for (a, b) in self.slots.iter_mut().zip(&other.slots) {
            if let (Some(a), Some(b)) = (a.as_mut(), b.as_ref()) {
                Zip::from(a).and(b).for_each(|a, &b| *a += factor * b);
            }
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: T) {
        for s in self.slots.iter_mut().flatten() {
            s.mapv_inplace(|x| x * factor);
        }
    }

    /// Iterates `(id, gradient)` over trainable tensors.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &ArrayD<T>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|g| (ParamId(i), g)))
    }

    /// Iterates `(id, gradient)` mutably over trainable tensors.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ParamId, &mut ArrayD<T>)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| g.as_mut().map(|g| (ParamId(i), g)))
    }
}

/// One trainable tensor during an optimizer step: its name, its values and its gradient,
/// borrowed from a [`ParamStore`] and its [`Grads`].
#[derive(Debug)]
pub struct ParamSlot<'a> {
    /// Stable tensor name.
    pub name: &'a str,
    /// Values, updated in place.
    pub value: &'a mut [f32],
    /// Gradient of the loss; wrappers may modify it before the update.
    pub grad: &'a mut [f32],
}

/// A named dense f32 tensor: name, shape, flat row-major values.
///
/// The one dense tensor type of fedpeft: a tail's trainable parameters, the global adapter and
/// client deltas in the aggregator (and its checkpoints), and the edge client's decoded tensors.
/// The wire codecs (which carry shapes as `u32` and values as f32, f16, int8 or top-k sparse)
/// convert to and from it at their boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    /// Stable name, e.g. `head.weight`.
    pub name: String,
    /// Shape, e.g. `[10, 1280]`.
    pub shape: Vec<usize>,
    /// Row-major values; `values.len()` is the product of `shape`.
    pub values: Vec<f32>,
}

impl NamedTensor {
    /// Builds a tensor, checking that the values fill the shape.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        let name = name.into();
        check_len(&name, &shape, values.len())?;
        Ok(Self {
            name,
            shape,
            values,
        })
    }

    /// A tensor of zeros.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let n = numel(&shape);
        Self {
            name: name.into(),
            shape,
            values: vec![0.0; n],
        }
    }

    /// Number of values the shape calls for (the product of `shape`; 1 for a scalar).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// Number of elements of a shape (the product of its dimensions; 1 for `[]`).
fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Checks that `got` values fill `shape`: a [`PeftError::Length`] naming `name` if not.
pub(crate) fn check_len(name: &str, shape: &[usize], got: usize) -> Result<()> {
    let expected = numel(shape);
    if expected != got {
        return Err(PeftError::Length {
            name: name.to_string(),
            shape: shape.to_vec(),
            expected,
            got,
        });
    }
    Ok(())
}

/// Converts an f32 slice with a shape into an `ArrayD<T>`, checking the length.
pub(crate) fn array_from_f32<T: Real>(
    name: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<ArrayD<T>> {
    check_len(name, shape, data.len())?;
    Ok(ArrayD::from_shape_vec(
        IxDyn(shape),
        data.iter().map(|&x| T::lit(x as f64)).collect(),
    )
    .expect("length checked above"))
}

impl ParamStore<f32> {
    /// Pairs each trainable tensor with its gradient, in stable order, for an optimizer.
    pub(crate) fn slots<'a>(&'a mut self, grads: &'a mut Grads<f32>) -> Vec<ParamSlot<'a>> {
        self.params
            .iter_mut()
            .zip(grads.slots.iter_mut())
            .filter_map(|(p, g)| {
                let g = g.as_mut()?;
                Some(ParamSlot {
                    name: p.name.as_str(),
                    value: p.value.as_slice_mut().expect("standard layout"),
                    grad: g.as_slice_mut().expect("standard layout"),
                })
            })
            .collect()
    }
}
