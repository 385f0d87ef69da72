//! The Houlsby adapter the `adapter` method inserts into every transformer block.

use std::sync::Arc;

use ndarray::Array2;
use rand::rngs::StdRng;

use super::build::{dense, uniform, zeros};
use crate::error::Result;
use crate::layers::{Linear, LinearCache, gelu_backward, gelu_forward};
use crate::params::{Grads, ParamStore};
use crate::real::Real;

/// A Houlsby adapter: `h + up(GELU(down(h)))`, `up` zero-initialised (identity at start).
#[derive(Debug, Clone)]
pub(super) struct Adapter {
    down: Linear,
    up: Linear,
}

pub(super) struct AdapterCache<T> {
    down: LinearCache<T>,
    z: Array2<T>,
    up: LinearCache<T>,
}

impl Adapter {
    pub(super) fn new<T: Real>(
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
        prefix: &str,
        d: usize,
        m: usize,
    ) -> Result<Self> {
        let bound = 1.0 / (d as f64).sqrt();
        let dw = params.add(
            &format!("{prefix}.down.weight"),
            uniform(rng, &[m, d], bound),
            true,
        )?;
        let db = params.add(
            &format!("{prefix}.down.bias"),
            uniform(rng, &[m], bound),
            true,
        )?;
        let uw = params.add(&format!("{prefix}.up.weight"), zeros(&[d, m]), true)?;
        let ub = params.add(&format!("{prefix}.up.bias"), zeros(&[d]), true)?;
        Ok(Self {
            down: dense(dw, db),
            up: dense(uw, ub),
        })
    }

    pub(super) fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        h: Array2<T>,
    ) -> (Array2<T>, AdapterCache<T>) {
        let h = Arc::new(h);
        let (z, down) = self.down.forward(p, &h, None);
        let g = Arc::new(gelu_forward(z.view()));
        let (r, up) = self.up.forward(p, &g, None);
        let mut out = Arc::try_unwrap(h).unwrap_or_else(|a| (*a).clone());
        out += &r;
        (out, AdapterCache { down, z, up })
    }

    pub(super) fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: AdapterCache<T>,
        dy: Array2<T>,
        grads: &mut Grads<T>,
    ) -> Array2<T> {
        let dg = self
            .up
            .backward(p, c.up, dy.view(), grads, true)
            .expect("dx requested");
        let dz = gelu_backward(c.z.view(), dg);
        let dh = self
            .down
            .backward(p, c.down, dz.view(), grads, true)
            .expect("dx requested");
        dy + dh
    }
}
