//! Steps that run as Rust code instead of a generated kernel: matrix products
//! (straight onto the GEMM driver), and every op without a kernel yet, through the
//! interpreter's own `eval` on copies of its inputs (slow, but exact: the
//! reference semantics). `cnnc dump --stage=plan` marks them `native` and `ref`.

use super::gemm;
use crate::interp::{self, Tensor};
use crate::ir::{Op, Shape};
use ndarray::{ArrayD, IxDyn};

#[derive(Clone, Debug, PartialEq)]
pub enum Native {
    /// `c[m,n] = op(a)·op(b)`, `op` = transpose when the flag is set. Buffers: a, b, c.
    MatMul {
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    },
    /// Softmax cross-entropy and its gradient in one pass over the logits:
    /// `(logits[n,k], labels[n]) → (loss[], dlogits[n,k])`, the formulas and
    /// rounding of `softmax_xent` followed by `softmax_xent_grad` (the
    /// probabilities never leave the row being processed).
    SoftmaxXentFused { n: usize, k: usize, smoothing: f64 },
    /// Any op, by the interpreter. Buffers: the op's inputs, then its outputs.
    Reference {
        op: Op,
        ins: Vec<Shape>,
        outs: Vec<Shape>,
    },
}

impl Native {
    /// The step for a matrix product `a[.., ..] · b[.., ..]` of IR shapes.
    pub fn matmul(a: &Shape, b: &Shape, ta: bool, tb: bool) -> Native {
        let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
        let n = if tb { b[0] } else { b[1] };
        Native::MatMul { m, n, k, ta, tb }
    }

    /// The native step for an op without a generated kernel: Rust code where
    /// there is some, else the interpreter's `eval`.
    pub fn for_op(op: &Op, ins: Vec<Shape>, outs: Vec<Shape>) -> Native {
        Native::Reference {
            op: op.clone(),
            ins,
            outs,
        }
    }

    /// A short name for plans and profiles.
    pub fn label(&self) -> String {
        match self {
            Native::MatMul { .. } => format!("native gemm ({})", gemm::sgemm_kernel_name()),
            Native::SoftmaxXentFused { .. } => "native softmax_xent".to_string(),
            Native::Reference { .. } => "ref interpreter".to_string(),
        }
    }

    /// Floating-point operations of one run.
    pub fn flops(&self) -> u64 {
        match self {
            Native::MatMul { m, n, k, .. } => 2 * (m * n * k) as u64,
            Native::SoftmaxXentFused { .. } | Native::Reference { .. } => 0,
        }
    }

    /// Runs the step. `ins` and `outs` have the lengths of the step's shapes (the
    /// planner guarantees it).
    pub fn run(&self, ins: &[&[f32]], outs: &mut [&mut [f32]]) {
        match self {
            Native::MatMul { m, n, k, ta, tb } => {
                let (m, n, k) = (*m, *n, *k);
                let (rsa, csa) = if *ta {
                    (1, m as isize)
                } else {
                    (k as isize, 1)
                };
                let (rsb, csb) = if *tb {
                    (1, k as isize)
                } else {
                    (n as isize, 1)
                };
                assert!(ins[0].len() >= m * k && ins[1].len() >= k * n && outs[0].len() >= m * n);
                // SAFETY: the strides address m×k and k×n elements inside the
                // checked slices; c is m×n with row stride n.
                unsafe {
                    gemm::sgemm(
                        m,
                        n,
                        k,
                        ins[0].as_ptr(),
                        rsa,
                        csa,
                        ins[1].as_ptr(),
                        rsb,
                        csb,
                        outs[0].as_mut_ptr(),
                        n as isize,
                        0,
                    )
                }
            }
            Native::SoftmaxXentFused { n, k, smoothing } => {
                softmax_xent_fused(*n, *k, *smoothing, ins[0], ins[1], outs)
            }
            Native::Reference {
                op,
                ins: shapes,
                outs: out_shapes,
            } => {
                let tensors: Vec<Tensor<f32>> = shapes
                    .iter()
                    .zip(ins)
                    .map(|(s, d)| {
                        ArrayD::from_shape_vec(IxDyn(s), d.to_vec()).expect("planned shape")
                    })
                    .collect();
                let refs: Vec<&Tensor<f32>> = tensors.iter().collect();
                let results = interp::eval(op, &refs, out_shapes);
                for (dst, t) in outs.iter_mut().zip(results) {
                    let t = t.as_standard_layout();
                    dst.copy_from_slice(t.as_slice().expect("standard layout"));
                }
            }
        }
    }
}

/// The label-smoothed target of class `j` (the interpreter's `target`).
fn target(is_label: bool, smoothing: f64, k: usize) -> f32 {
    ((if is_label { 1.0 - smoothing } else { 0.0 }) + smoothing / k as f64) as f32
}

/// See [`Native::SoftmaxXentFused`]; the same f32 operations, in the same order,
/// as the interpreter's two ops, so the results are identical.
fn softmax_xent_fused(
    n: usize,
    k: usize,
    smoothing: f64,
    logits: &[f32],
    labels: &[f32],
    outs: &mut [&mut [f32]],
) {
    let mut loss = 0f32;
    let inv_n = n as f32;
    for i in 0..n {
        let row = &logits[i * k..(i + 1) * k];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum = row.iter().fold(0f32, |a, &z| a + (z - max).exp());
        let lse = max + sum.ln();
        // The interpreter reads labels with `to_usize`: negative or NaN → 0.
        let label = if labels[i] >= 0.0 {
            labels[i] as usize
        } else {
            0
        };
        for j in 0..k {
            let t = target(j == label, smoothing, k);
            loss -= t * (row[j] - lse);
            let p = (row[j] - lse).exp();
            outs[1][i * k + j] = (p - t) / inv_n;
        }
    }
    outs[0][0] = loss / inv_n;
}
