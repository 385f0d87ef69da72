//! Named tensors and their codecs: f32, f16, int8 (per-tensor scale, stochastic rounding), each
//! dense or top-k sparse, plus error feedback for the values a lossy codec did not send.
//!
//! Wire layout of one tensor (postcard, fields in this order):
//! `name: str`, `shape: [varint u32]` (at most [`MAX_RANK`] dims), `values: enum { 0 F32(bytes),
//! 1 F16(bytes), 2 I8 { scale: f32, bytes } }`, `indices: Option<[varint u32 delta]>`.
//! Value bytes are little-endian and carried as one length-prefixed byte string (not one varint
//! per element), so encoding and decoding are a copy. Sparse indices are strictly increasing and
//! sent as deltas from the previous index (the first from 0): top-k gaps are small, so most take
//! one byte instead of four.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::f16::{f16_bits_to_f32, f32_to_f16_bits};
use crate::rng::SplitMix64;

/// Most dimensions a tensor shape may have.
pub const MAX_RANK: usize = 8;
/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Most elements one tensor may have (2^26, 256 MiB as f32). A sparse tensor's shape is not
/// backed by bytes on the wire, so without this bound a 20-byte message could make
/// [`Tensor::to_f32`] allocate gigabytes.
pub const MAX_ELEMENTS: u64 = 1 << 26;

/// A tensor's shape: one `u32` per dimension, row-major.
pub type Shape = heapless::Vec<u32, MAX_RANK>;

/// Element type of a tensor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE binary32, 4 bytes.
    F32,
    /// IEEE binary16, 2 bytes, round-to-nearest-even.
    F16,
    /// Signed 8-bit with one f32 scale per tensor, stochastic rounding.
    I8,
}

impl DType {
    /// Bytes per element on the wire.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::I8 => 1,
        }
    }

    /// Lower-case name, as used in configs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "int8",
        }
    }
}

/// The values of a tensor (all of them when dense, the selected ones when sparse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Values {
    /// f32 values.
    F32(#[serde(with = "le_f32")] Vec<f32>),
    /// f16 values as raw IEEE binary16 bits.
    F16(#[serde(with = "le_u16")] Vec<u16>),
    /// int8 values; the real value of `q` is `q as f32 * scale`.
    I8 {
        /// Per-tensor scale, `max |x| / 127`.
        scale: f32,
        /// Quantized values in `[-127, 127]`.
        #[serde(with = "i8_bytes")]
        values: Vec<i8>,
    },
}

impl Values {
    /// The dtype of these values.
    pub fn dtype(&self) -> DType {
        match self {
            Values::F32(_) => DType::F32,
            Values::F16(_) => DType::F16,
            Values::I8 { .. } => DType::I8,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::I8 { values, .. } => values.len(),
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as f32 (exact for f32 and f16; `q * scale` for int8).
    pub fn get_f32(&self, i: usize) -> Option<f32> {
        match self {
            Values::F32(v) => v.get(i).copied(),
            Values::F16(v) => v.get(i).map(|&h| f16_bits_to_f32(h)),
            Values::I8 { scale, values } => values.get(i).map(|&q| f32::from(q) * scale),
        }
    }

    /// Calls `f(i, value_i as f32)` for every value; one dtype dispatch, not one per element.
    pub fn for_each_f32(&self, mut f: impl FnMut(usize, f32)) {
        match self {
            Values::F32(v) => v.iter().enumerate().for_each(|(i, &x)| f(i, x)),
            Values::F16(v) => v
                .iter()
                .enumerate()
                .for_each(|(i, &h)| f(i, f16_bits_to_f32(h))),
            Values::I8 { scale, values } => values
                .iter()
                .enumerate()
                .for_each(|(i, &q)| f(i, f32::from(q) * scale)),
        }
    }

    /// All values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Values::F32(v) => v.clone(),
            Values::F16(v) => v.iter().map(|&h| f16_bits_to_f32(h)).collect(),
            Values::I8 { scale, values } => values.iter().map(|&q| f32::from(q) * scale).collect(),
        }
    }
}

/// How to encode f32 values: element type and optional top-k sparsification.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Codec {
    /// Element type on the wire.
    pub dtype: DType,
    /// Keep only this fraction (in `(0, 1]`) of the values, the largest in magnitude.
    pub top_k_fraction: Option<f32>,
}

impl Codec {
    /// Dense encoding with the given dtype.
    pub fn dense(dtype: DType) -> Self {
        Self {
            dtype,
            top_k_fraction: None,
        }
    }

    /// Top-k encoding keeping `fraction` of the values.
    pub fn top_k(dtype: DType, fraction: f32) -> Self {
        Self {
            dtype,
            top_k_fraction: Some(fraction),
        }
    }
}

/// A tensor that is structurally wrong: bad shape, lengths that do not match, bad indices.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorError {
    /// The name is empty or longer than [`MAX_NAME_LEN`].
    BadName {
        /// The name (possibly truncated for display by the caller).
        name: String,
    },
    /// More than [`MAX_RANK`] dimensions.
    RankTooHigh {
        /// Tensor name.
        name: String,
        /// Dimensions given.
        rank: usize,
    },
    /// The shape has more than [`MAX_ELEMENTS`] elements.
    TooManyElements {
        /// Tensor name.
        name: String,
        /// Product of the shape (saturating).
        elements: u64,
    },
    /// Dense tensor whose value count differs from the shape's element count.
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Elements the shape implies.
        expected: u64,
        /// Values present.
        found: usize,
    },
    /// Sparse tensor whose index count differs from its value count.
    SparseLengthMismatch {
        /// Tensor name.
        name: String,
        /// Number of indices.
        indices: usize,
        /// Number of values.
        values: usize,
    },
    /// A sparse index is out of range or not strictly above the previous one.
    BadIndex {
        /// Tensor name.
        name: String,
        /// Position in the index list.
        position: usize,
        /// The index found there.
        index: u32,
    },
    /// An int8 value of -128 (the codec only produces `[-127, 127]`, symmetric around zero).
    Int8OutOfRange {
        /// Tensor name.
        name: String,
        /// Element position.
        position: usize,
    },
    /// Input to a codec contains NaN or infinity, which int8 cannot represent.
    NonFiniteInput {
        /// Tensor name.
        name: String,
        /// Element position.
        position: usize,
    },
    /// `top_k_fraction` is not in `(0, 1]`.
    BadTopKFraction {
        /// Tensor name.
        name: String,
        /// The fraction given.
        fraction: f32,
    },
    /// Two tensors in one message share a name.
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// The residual buffer for error feedback has the wrong length.
    ResidualLengthMismatch {
        /// Tensor name.
        name: String,
        /// Values given.
        expected: usize,
        /// Residual length.
        found: usize,
    },
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorError::BadName { name } => {
                write!(f, "tensor name {name:?} must be 1..={MAX_NAME_LEN} bytes")
            }
            TensorError::RankTooHigh { name, rank } => {
                write!(
                    f,
                    "tensor {name:?} has {rank} dimensions, at most {MAX_RANK} allowed"
                )
            }
            TensorError::TooManyElements { name, elements } => write!(
                f,
                "tensor {name:?} has {elements} elements, at most {MAX_ELEMENTS} allowed"
            ),
            TensorError::LengthMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name:?}: shape implies {expected} values but {found} are present"
            ),
            TensorError::SparseLengthMismatch {
                name,
                indices,
                values,
            } => write!(
                f,
                "sparse tensor {name:?} has {indices} indices but {values} values"
            ),
            TensorError::BadIndex {
                name,
                position,
                index,
            } => write!(
                f,
                "sparse tensor {name:?}: index {index} at position {position} is out of range or not increasing"
            ),
            TensorError::Int8OutOfRange { name, position } => {
                write!(
                    f,
                    "int8 tensor {name:?}: value -128 at position {position} (range is -127..=127)"
                )
            }
            TensorError::NonFiniteInput { name, position } => write!(
                f,
                "tensor {name:?}: non-finite input at position {position} cannot be quantized"
            ),
            TensorError::BadTopKFraction { name, fraction } => write!(
                f,
                "tensor {name:?}: top-k fraction {fraction} is not in (0, 1]"
            ),
            TensorError::DuplicateName { name } => {
                write!(
                    f,
                    "tensor name {name:?} appears more than once in one message"
                )
            }
            TensorError::ResidualLengthMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name:?}: residual has {found} values, expected {expected}"
            ),
        }
    }
}

impl core::error::Error for TensorError {}

/// A NaN or infinity found by [`Tensor::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    /// Tensor name.
    pub tensor: String,
    /// Element position within the sent values (`None`: the int8 scale itself).
    pub position: Option<usize>,
    /// The offending value.
    pub value: f32,
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(
                f,
                "tensor {:?} has non-finite value {} at position {p}",
                self.tensor, self.value
            ),
            None => write!(
                f,
                "tensor {:?} has non-finite int8 scale {}",
                self.tensor, self.value
            ),
        }
    }
}

impl core::error::Error for NonFinite {}

/// A named tensor, dense or top-k sparse. Fields are private so every `Tensor` obtained through
/// a constructor or [`crate::Envelope::decode`] is structurally consistent. (The serde
/// `Deserialize` impl alone does not check: see [`Tensor::check_structure`].)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    name: String,
    shape: Shape,
    values: Values,
    #[serde(with = "delta_indices")]
    indices: Option<Vec<u32>>,
}

fn element_count(shape: &[u32]) -> u64 {
    shape
        .iter()
        .fold(1u64, |acc, &d| acc.saturating_mul(u64::from(d)))
}

impl Tensor {
    /// A dense tensor from already-encoded values.
    pub fn dense(name: &str, shape: &[u32], values: Values) -> Result<Self, TensorError> {
        Self::from_parts(name, shape, values, None)
    }

    /// A sparse tensor: `values[i]` sits at flat (row-major) position `indices[i]`; indices
    /// strictly increasing; every other element is zero.
    pub fn sparse(
        name: &str,
        shape: &[u32],
        indices: Vec<u32>,
        values: Values,
    ) -> Result<Self, TensorError> {
        Self::from_parts(name, shape, values, Some(indices))
    }

    fn from_parts(
        name: &str,
        shape: &[u32],
        values: Values,
        indices: Option<Vec<u32>>,
    ) -> Result<Self, TensorError> {
        let shape = Shape::from_slice(shape).map_err(|_| TensorError::RankTooHigh {
            name: name.into(),
            rank: shape.len(),
        })?;
        let t = Tensor {
            name: name.into(),
            shape,
            values,
            indices,
        };
        t.check_structure()?;
        Ok(t)
    }

    /// Checks structural consistency. [`crate::Envelope::decode`] and the constructors call it;
    /// call it yourself only if you deserialize a bare `Tensor` with serde.
    pub fn check_structure(&self) -> Result<(), TensorError> {
        let name = || self.name.clone();
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(TensorError::BadName { name: name() });
        }
        let elements = element_count(&self.shape);
        if elements > MAX_ELEMENTS {
            return Err(TensorError::TooManyElements {
                name: name(),
                elements,
            });
        }
        match &self.indices {
            None => {
                if self.values.len() as u64 != elements {
                    return Err(TensorError::LengthMismatch {
                        name: name(),
                        expected: elements,
                        found: self.values.len(),
                    });
                }
            }
            Some(indices) => {
                if indices.len() != self.values.len() {
                    return Err(TensorError::SparseLengthMismatch {
                        name: name(),
                        indices: indices.len(),
                        values: self.values.len(),
                    });
                }
                let mut prev: Option<u32> = None;
                for (position, &index) in indices.iter().enumerate() {
                    let increasing = prev.is_none_or(|p| index > p);
                    if !increasing || u64::from(index) >= elements {
                        return Err(TensorError::BadIndex {
                            name: name(),
                            position,
                            index,
                        });
                    }
                    prev = Some(index);
                }
            }
        }
        if let Values::I8 { values, .. } = &self.values
            && let Some(position) = values.iter().position(|&q| q == i8::MIN)
        {
            return Err(TensorError::Int8OutOfRange {
                name: name(),
                position,
            });
        }
        Ok(())
    }

    /// Encodes f32 `data` (row-major, `shape`'s element count) with `codec`. `rng` drives int8
    /// stochastic rounding; f32 and f16 do not use it.
    pub fn encode(
        name: &str,
        shape: &[u32],
        data: &[f32],
        codec: Codec,
        rng: &mut SplitMix64,
    ) -> Result<Self, TensorError> {
        let elements = element_count(shape);
        if elements != data.len() as u64 {
            return Err(TensorError::LengthMismatch {
                name: name.into(),
                expected: elements,
                found: data.len(),
            });
        }
        match codec.top_k_fraction {
            None => {
                let values = quantize(name, data.iter().copied(), data.len(), codec.dtype, rng)?;
                Self::dense(name, shape, values)
            }
            Some(fraction) => {
                let indices = top_k_indices(name, data, fraction)?;
                let selected = indices.iter().map(|&i| data[i as usize]);
                let values = quantize(name, selected, indices.len(), codec.dtype, rng)?;
                Self::sparse(name, shape, indices, values)
            }
        }
    }

    /// Encodes `data + residual` with `codec` and leaves in `residual` what the encoding lost
    /// (`data + residual - decoded`), to be added to the next round's update (error feedback;
    /// Seide et al. 2014, Stich et al. 2018). The caller owns and keeps the residual.
    pub fn encode_with_feedback(
        name: &str,
        shape: &[u32],
        data: &[f32],
        residual: &mut [f32],
        codec: Codec,
        rng: &mut SplitMix64,
    ) -> Result<Self, TensorError> {
        if residual.len() != data.len() {
            return Err(TensorError::ResidualLengthMismatch {
                name: name.into(),
                expected: data.len(),
                found: residual.len(),
            });
        }
        for (r, &d) in residual.iter_mut().zip(data) {
            *r += d;
        }
        let tensor = Self::encode(name, shape, residual, codec, rng)?;
        tensor.subtract_from(residual);
        Ok(tensor)
    }

    /// `out[i] -= decoded[i]` without materialising the dense tensor (used by error feedback).
    fn subtract_from(&self, out: &mut [f32]) {
        self.for_each_dense(|i, x| {
            if let Some(o) = out.get_mut(i) {
                *o -= x;
            }
        });
    }

    /// Calls `f(position, value)` for every value sent: position is the flat element index
    /// (the sparse index for top-k tensors).
    pub fn for_each_dense(&self, mut f: impl FnMut(usize, f32)) {
        match &self.indices {
            None => self.values.for_each_f32(f),
            Some(indices) => self.values.for_each_f32(|k, x| {
                if let Some(&i) = indices.get(k) {
                    f(i as usize, x)
                }
            }),
        }
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// Number of elements the shape describes.
    pub fn num_elements(&self) -> usize {
        // Bounded by MAX_ELEMENTS, so this fits usize on every supported target.
        element_count(&self.shape) as usize
    }

    /// The values sent (all elements when dense, the selected ones when sparse).
    pub fn values(&self) -> &Values {
        &self.values
    }

    /// Sparse indices, or `None` when dense.
    pub fn indices(&self) -> Option<&[u32]> {
        self.indices.as_deref()
    }

    /// Element type on the wire.
    pub fn dtype(&self) -> DType {
        self.values.dtype()
    }

    /// Decodes to a dense row-major f32 vector (zeros where a sparse tensor sent nothing).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.indices {
            None => self.values.to_f32(),
            Some(_) => {
                let mut out = alloc::vec![0.0f32; self.num_elements()];
                self.for_each_dense(|i, x| {
                    if let Some(o) = out.get_mut(i) {
                        *o = x;
                    }
                });
                out
            }
        }
    }

    /// Adds `weight * self` into `acc` (length = element count), without allocating: the
    /// aggregator's streaming weighted sum.
    pub fn accumulate_into(&self, acc: &mut [f32], weight: f32) -> Result<(), TensorError> {
        if acc.len() != self.num_elements() {
            return Err(TensorError::LengthMismatch {
                name: self.name.clone(),
                expected: self.num_elements() as u64,
                found: acc.len(),
            });
        }
        self.for_each_dense(|i, x| {
            if let Some(a) = acc.get_mut(i) {
                *a += weight * x;
            }
        });
        Ok(())
    }

    /// Reports the first NaN or infinity (values, or the int8 scale) with the tensor's name.
    /// Decoding keeps such values so they can be inspected; aggregation must reject them.
    pub fn validate(&self) -> Result<(), NonFinite> {
        if let Values::I8 { scale, .. } = &self.values
            && !scale.is_finite()
        {
            return Err(NonFinite {
                tensor: self.name.clone(),
                position: None,
                value: *scale,
            });
        }
        let mut first = None;
        self.values.for_each_f32(|i, v| {
            if first.is_none() && !v.is_finite() {
                first = Some((i, v));
            }
        });
        match first {
            Some((i, v)) => Err(NonFinite {
                tensor: self.name.clone(),
                position: Some(i),
                value: v,
            }),
            None => Ok(()),
        }
    }

    /// Bytes of value and index payload, excluding name and shape (for size reports).
    pub fn payload_bytes(&self) -> usize {
        self.values.len() * self.dtype().size() + self.indices.as_ref().map_or(0, |i| i.len() * 4)
    }
}

/// Picks the `max(1, round(fraction * n))` largest-magnitude positions, returned in increasing order.
/// NaN counts as largest so it is sent (and then rejected by validation) rather than hidden.
fn top_k_indices(name: &str, data: &[f32], fraction: f32) -> Result<Vec<u32>, TensorError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(TensorError::BadTopKFraction {
            name: name.into(),
            fraction,
        });
    }
    let n = data.len();
    // Nearest, not ceiling: 0.1f32 is 0.100000001..., and ceil(0.100000001 * 1000) = 101.
    let k = ((f64::from(fraction) * n as f64 + 0.5) as usize).clamp(usize::from(n > 0), n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    if k < n {
        let magnitude = |i: &u32| {
            let v = data[*i as usize];
            if v.is_nan() { f32::INFINITY } else { v.abs() }
        };
        order.select_nth_unstable_by(k, |a, b| magnitude(b).total_cmp(&magnitude(a)));
        order.truncate(k);
    }
    order.sort_unstable();
    Ok(order)
}

fn quantize(
    name: &str,
    data: impl Iterator<Item = f32> + Clone,
    len: usize,
    dtype: DType,
    rng: &mut SplitMix64,
) -> Result<Values, TensorError> {
    Ok(match dtype {
        DType::F32 => Values::F32(data.collect()),
        DType::F16 => Values::F16(data.map(f32_to_f16_bits).collect()),
        DType::I8 => {
            let mut max = 0.0f32;
            for (position, x) in data.clone().enumerate() {
                if !x.is_finite() {
                    return Err(TensorError::NonFiniteInput {
                        name: name.into(),
                        position,
                    });
                }
                max = max.max(x.abs());
            }
            let mut values = Vec::with_capacity(len);
            if max == 0.0 {
                values.resize(len, 0);
                return Ok(Values::I8 { scale: 0.0, values });
            }
            // For inputs near the bottom of the subnormal range max / 127 underflows to zero;
            // the smallest positive f32 still keeps every |x / scale| <= 127.
            let scale = (max / 127.0).max(f32::from_bits(1));
            for x in data {
                // A division, not a multiplication by 1 / scale: that reciprocal overflows for
                // subnormal scales.
                values.push(stochastic_round(x / scale, rng));
            }
            Values::I8 { scale, values }
        }
    })
}

/// `floor(y + u)` with `u` uniform in `[0, 1)`: equals `floor(y)` or `floor(y) + 1` with the
/// probabilities that make its expectation `y`. Clamped to the symmetric int8 range.
fn stochastic_round(y: f32, rng: &mut SplitMix64) -> i8 {
    let t = y + rng.next_f32();
    // `floor` lives in std; for |t| <= 129 a truncating cast and one correction is exact.
    let mut q = t as i32;
    if (q as f32) > t {
        q -= 1;
    }
    q.clamp(-127, 127) as i8
}

/// Element data as one little-endian byte string per tensor.
mod le_f32 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        crate::bytes::deserialize_with(d, |bytes| {
            if bytes.len() % 4 != 0 {
                return Err("f32 data length is not a multiple of 4");
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
    }
}

mod le_u16 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u16], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 2);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        crate::bytes::deserialize_with(d, |bytes| {
            if bytes.len() % 2 != 0 {
                return Err("f16 data length is not a multiple of 2");
            }
            Ok(bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect())
        })
    }
}

mod i8_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[i8], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().map(|&q| q as u8).collect();
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i8>, D::Error> {
        crate::bytes::deserialize_with(d, |bytes| Ok(bytes.iter().map(|&b| b as i8).collect()))
    }
}

/// Sparse indices as varint deltas (see the module docs).
mod delta_indices {
    use super::*;
    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    struct Deltas<'a>(&'a [u32]);

    impl Serialize for Deltas<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            let mut prev = 0u32;
            for &i in self.0 {
                seq.serialize_element(&i.wrapping_sub(prev))?;
                prev = i;
            }
            seq.end()
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u32>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(v) => s.serialize_some(&Deltas(v)),
        }
    }

    struct Undelta(Vec<u32>);

    impl<'de> Deserialize<'de> for Undelta {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Undelta;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a sequence of index deltas")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Undelta, A::Error> {
                    // Never trust the claimed length for the allocation: a varint can claim 4
                    // billion elements in five bytes.
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                    let mut prev = 0u32;
                    while let Some(delta) = seq.next_element::<u32>()? {
                        // Wrapping is intentional: a bad delta shows up as a non-increasing
                        // index, which the structural check reports with the tensor's name.
                        prev = prev.wrapping_add(delta);
                        out.push(prev);
                    }
                    Ok(Undelta(out))
                }
            }
            d.deserialize_seq(V)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
        Ok(Option::<Undelta>::deserialize(d)?.map(|u| u.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_magnitudes_in_index_order() {
        let data = [0.1, -5.0, 0.2, 3.0, -0.3, 0.0];
        let idx = top_k_indices("t", &data, 0.5).unwrap();
        assert_eq!(idx, alloc::vec![1, 3, 4]);
        assert_eq!(top_k_indices("t", &data, 1.0).unwrap().len(), 6);
        assert_eq!(top_k_indices("t", &data, 0.01).unwrap(), alloc::vec![1]);
        assert!(top_k_indices("t", &data, 0.0).is_err());
        assert!(top_k_indices("t", &data, f32::NAN).is_err());
    }

    #[test]
    fn int8_of_all_zeros_is_zero_with_zero_scale() {
        let mut rng = SplitMix64::new(1);
        let t = Tensor::encode("z", &[3], &[0.0; 3], Codec::dense(DType::I8), &mut rng).unwrap();
        assert_eq!(
            t.values(),
            &Values::I8 {
                scale: 0.0,
                values: alloc::vec![0, 0, 0]
            }
        );
    }

    #[test]
    fn int8_refuses_non_finite_input_naming_the_tensor() {
        let mut rng = SplitMix64::new(1);
        let err = Tensor::encode(
            "w",
            &[2],
            &[1.0, f32::NAN],
            Codec::dense(DType::I8),
            &mut rng,
        )
        .unwrap_err();
        assert_eq!(
            err,
            TensorError::NonFiniteInput {
                name: "w".into(),
                position: 1
            }
        );
    }
}
