//! `rope_grad`: the rotary-embedding op on the device (`backends/cuda/rope.cu` on CUDA) against float64:
//! its output and its input's gradient, for a strided input (a projection's
//! `[batch, seq, heads, d]` output viewed as `[batch, heads, seq, d]`, as the model hands it
//! over), with one table for every row and with one per row (packed examples), and over part of
//! each head (`partial_rotary_factor`: the leading dimensions rotate, the rest pass through).

use burn::backend::Autodiff;
use burn::tensor::Tensor;
use rand::SeedableRng;
use serde_json::{Value, json};

use super::{KERNEL_TOLERANCE, scaled_error, tensor, uniform};
use crate::ops::ModelBackend;
use crate::ops::rope::RopeScaling;
use crate::ops::rope::{Rope, rope_leading};

/// The check's JSON line: RoPE over the leading `rotary` of 64 dimensions per head, one table or
/// one per row.
pub fn rope_grad<B: ModelBackend>(
    device: &B::Device,
    per_row_tables: bool,
    rotary: usize,
) -> Value {
    let [batch, heads, seq, d] = [2, 3, 37, 64];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seq as u64 + u64::from(per_row_tables));
    let x = uniform(&mut rng, batch * seq * heads * d, 1.0);
    let r = uniform(&mut rng, batch * heads * seq * d, 1.0);
    let rope = Rope::new(rotary, 10_000.0, &RopeScaling::None);
    let rows = if per_row_tables { batch } else { 1 };
    // Per-row positions restart part-way, as a packed row's second example does.
    let positions: Vec<usize> = (0..rows * seq)
        .map(|i| if i >= seq { (i - seq) % 20 } else { i + 5 })
        .collect();

    let x_seq_major = tensor::<Autodiff<B>, 4>(&x, [batch, seq, heads, d], device).require_grad();
    let (cos, sin) = rope.tables::<Autodiff<B>>(&positions, rows, device);
    let out = rope_leading(x_seq_major.clone().swap_dims(1, 2), cos, sin);
    let grads = (out.clone() * tensor::<Autodiff<B>, 4>(&r, [batch, heads, seq, d], device))
        .sum()
        .backward();
    let host = |t: Tensor<B, 4>| {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32")
    };
    let got_out = host(out.inner());
    let got_dx = host(x_seq_major.grad(&grads).expect("x tracked").swap_dims(1, 2));

    let half = rotary / 2;
    let (mut want_out, mut want_dx) = (vec![0f64; r.len()], vec![0f64; r.len()]);
    for (i, (o, g)) in want_out.iter_mut().zip(&mut want_dx).enumerate() {
        let (j, t, h, b) = (i % d, i / d % seq, i / d / seq % heads, i / d / seq / heads);
        let angle = positions[(b % rows) * seq + t] as f64 * f64::from(rope.inv_freq()[j % half]);
        let (c, s) = (angle.cos(), angle.sin());
        let at = |v: &[f64], jj: usize| v[((b * seq + t) * heads + h) * d + jj];
        let at_r = |jj: usize| r[((b * heads + h) * seq + t) * d + jj];
        if j >= rotary {
            (*o, *g) = (at(&x, j), at_r(j));
            continue;
        }
        let (partner, sign) = if j < half {
            (j + half, -1.0)
        } else {
            (j - half, 1.0)
        };
        *o = at(&x, j) * c + sign * at(&x, partner) * s;
        *g = at_r(j) * c - sign * at_r(partner) * s;
    }
    let errors = [
        scaled_error(&got_out, &want_out),
        scaled_error(&got_dx, &want_dx),
    ];
    json!({
        "check": "rope_grad", "batch": batch, "heads": heads, "seq": seq, "head_dim": d,
        "per_row_tables": per_row_tables, "rotary_dims": rotary, "output_error": errors[0], "dx_error": errors[1],
        "tolerance": KERNEL_TOLERANCE, "pass": errors.iter().all(|&e| e <= KERNEL_TOLERANCE),
    })
}
