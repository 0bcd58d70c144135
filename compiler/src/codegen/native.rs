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

    /// A short name for plans and profiles.
    pub fn label(&self) -> String {
        match self {
            Native::MatMul { .. } => format!("native gemm ({})", gemm::sgemm_kernel_name()),
            Native::Reference { .. } => "ref interpreter".to_string(),
        }
    }

    /// Floating-point operations of one run.
    pub fn flops(&self) -> u64 {
        match self {
            Native::MatMul { m, n, k, .. } => 2 * (m * n * k) as u64,
            Native::Reference { .. } => 0,
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
