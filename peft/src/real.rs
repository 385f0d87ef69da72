//! The scalar type the tail is generic over: `f32` for training, `f64` for gradient checks.

use ndarray::NdFloat;

/// A floating-point scalar for tail math. Method names are distinct from `num_traits::Float`
/// (a supertrait via [`NdFloat`]) so calls are never ambiguous.
pub trait Real: NdFloat + Default + std::iter::Sum {
    /// Converts an `f64` constant (exact for f64, rounded for f32).
    fn lit(x: f64) -> Self;
    /// Widens to `f64`.
    fn wide(self) -> f64;
    /// The error function, to 1 ulp (musl's implementation via `libm`).
    fn erf_(self) -> Self;
    /// The additive bias for a masked-out attention key: the dtype's most negative finite
    /// value, as current Hugging Face BERT does (`torch.finfo(dtype).min`).
    fn mask_bias() -> Self;
}

impl Real for f32 {
    fn lit(x: f64) -> Self {
        x as f32
    }
    fn wide(self) -> f64 {
        self as f64
    }
    fn erf_(self) -> Self {
        libm::erff(self)
    }
    fn mask_bias() -> Self {
        f32::MIN
    }
}

impl Real for f64 {
    fn lit(x: f64) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self
    }
    fn erf_(self) -> Self {
        libm::erf(self)
    }
    fn mask_bias() -> Self {
        f64::MIN
    }
}
