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
    /// GELU over a slice, `out[i] = GELU(x[i])`: the vectorised approximation of
    /// [`crate::gelu`] for `f32` (its error is stated there), the exact `libm` form for `f64`.
    fn gelu_slice(x: &[Self], out: &mut [Self]);
    /// The GELU backward pass in place, `dy[i] *= GELU'(u[i])`: approximate for `f32` as
    /// [`Self::gelu_slice`], exact for `f64`.
    fn gelu_grad_mul(u: &[Self], dy: &mut [Self]);
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
    fn gelu_slice(x: &[Self], out: &mut [Self]) {
        crate::gelu::gelu_slice(x, out);
    }
    fn gelu_grad_mul(u: &[Self], dy: &mut [Self]) {
        crate::gelu::gelu_grad_mul(u, dy);
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
    fn gelu_slice(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = crate::layers::gelu(v);
        }
    }
    fn gelu_grad_mul(u: &[Self], dy: &mut [Self]) {
        for (d, &v) in dy.iter_mut().zip(u) {
            *d *= crate::layers::gelu_grad(v);
        }
    }
}
