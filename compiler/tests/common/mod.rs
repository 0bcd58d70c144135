//! Shared by the JIT kernel tests: a deterministic generator, the interpreter as
//! the oracle for one op, and `check`, which runs a node's kernel over the whole
//! work range and split in two (adding partial sums for `Par::Reduce` kernels)
//! and compares with the oracle.

#![allow(dead_code)]

use cnnc_compiler::codegen::{Jit, KernelSpec, Par};
use cnnc_compiler::interp::{run, Scalar, Tensor};
use cnnc_compiler::ir::*;
use ndarray::{ArrayD, IxDyn};

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `lo..=hi`.
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() * (hi - lo + 1) as f64) as usize
    }
    /// Uniform in [-1, 1), with some exact zeros (the ReLU boundary).
    pub fn data(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if self.next() < 0.05 {
                    0.0
                } else {
                    (self.next() * 2.0 - 1.0) as f32
                }
            })
            .collect()
    }
}

/// The interpreter's outputs for `op` applied to `inputs`, in f32.
pub fn oracle(op: Op, inputs: &[(Shape, Vec<f32>)]) -> Vec<Vec<f32>> {
    oracle_in(op, inputs)
}

/// The interpreter's outputs for `op` applied to `inputs`, in any precision.
fn oracle_in<T: Scalar>(op: Op, inputs: &[(Shape, Vec<T>)]) -> Vec<Vec<T>> {
    let mut g = Graph::new("one");
    let ids: Vec<Vid> = inputs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.add_value(format!("in{i}"), s.clone(), Role::Input))
        .collect();
    let outs = g.push(op, &ids, None);
    let feeds = ids
        .iter()
        .zip(inputs)
        .map(|(&v, (s, d))| {
            let t: Tensor<T> = ArrayD::from_shape_vec(IxDyn(s), d.clone()).unwrap();
            (v, t)
        })
        .collect();
    let vals = run(&g, feeds).unwrap();
    outs.iter()
        .map(|o| vals.get(*o).iter().copied().collect())
        .collect()
}

/// Compiles `op` on `inputs` (via `KernelSpec::from_node`), runs it over the whole
/// batch and again split into two work ranges, and compares with the oracle.
pub fn check(jit: &mut Jit, op: Op, inputs: &[(Shape, Vec<f32>)], tol: f32, what: &str) {
    let want = oracle(op.clone(), inputs);
    let mut g = Graph::new("one");
    let ids: Vec<Vid> = inputs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.add_value(format!("in{i}"), s.clone(), Role::Input))
        .collect();
    g.push(op, &ids, None);
    let spec = KernelSpec::from_node(&g, &g.nodes[0]).expect("a kernel for this op");
    let id = jit.compile(what, spec.clone()).unwrap();
    let ins: Vec<&[f32]> = inputs.iter().map(|(_, d)| d.as_slice()).collect();
    let batch = spec.work();
    let splits: Vec<Vec<std::ops::Range<usize>>> = if batch > 1 {
        vec![vec![0..batch], vec![0..batch / 2, batch / 2..batch]]
    } else {
        vec![vec![0..batch]]
    };
    for ranges in splits {
        let mut outs: Vec<Vec<f32>> = spec
            .outputs()
            .iter()
            .map(|s| vec![f32::NAN; s.iter().product()])
            .collect();
        for (i, r) in ranges.iter().enumerate() {
            if spec.par() == Par::Reduce && i > 0 {
                // Partial sums: run the range into fresh outputs and add them.
                let mut part: Vec<Vec<f32>> =
                    outs.iter().map(|v| vec![f32::NAN; v.len()]).collect();
                let mut o: Vec<&mut [f32]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
                jit.run(id, &ins, &mut o, r.clone()).unwrap();
                for (acc, p) in outs.iter_mut().zip(&part) {
                    acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
            } else {
                let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
                jit.run(id, &ins, &mut o, r.clone()).unwrap();
            }
        }
        for (got, want) in outs.iter().zip(&want) {
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= tol,
                    "{what} {ranges:?}: element {i}: jit {a} vs interpreter {b}"
                );
            }
        }
    }
}

/// Uniform in [-1, 1) as f64, with some exact zeros (the ReLU boundary).
pub fn data64(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            if rng.next() < 0.05 {
                0.0
            } else {
                rng.next() * 2.0 - 1.0
            }
        })
        .collect()
}

/// The interpreter's outputs in f64 for `op` applied to `inputs`.
pub fn oracle64(op: Op, inputs: &[(Shape, Vec<f64>)]) -> Vec<Vec<f64>> {
    oracle_in(op, inputs)
}

/// [`check`] in f64: `spec` (the node's kernel, or another kernel computing
/// `op`) compiled for f64, run over the whole batch and split in two, against the
/// interpreter in f64; every element within `tol` of the output's scale.
pub fn check64(
    jit: &mut Jit,
    op: Op,
    spec: Option<KernelSpec>,
    inputs: &[(Shape, Vec<f64>)],
    tol: f64,
    what: &str,
) {
    let want = oracle64(op.clone(), inputs);
    let spec = spec.unwrap_or_else(|| {
        let mut g = Graph::new("one");
        let ids: Vec<Vid> = inputs
            .iter()
            .enumerate()
            .map(|(i, (s, _))| g.add_value(format!("in{i}"), s.clone(), Role::Input))
            .collect();
        g.push(op, &ids, None);
        KernelSpec::from_node(&g, &g.nodes[0]).expect("a kernel for this op")
    });
    let id = jit
        .compile_dtype(what, spec.clone(), cnnc_compiler::codegen::DType::F64)
        .unwrap();
    let ins: Vec<&[f64]> = inputs.iter().map(|(_, d)| d.as_slice()).collect();
    let batch = spec.work();
    let mut splits = vec![vec![0..batch]];
    if batch > 1 {
        splits.push(vec![0..batch / 2, batch / 2..batch]);
    }
    for ranges in splits {
        let mut outs: Vec<Vec<f64>> = spec
            .outputs()
            .iter()
            .map(|s| vec![f64::NAN; s.iter().product()])
            .collect();
        for (i, r) in ranges.iter().enumerate() {
            if spec.par() == Par::Reduce && i > 0 {
                let mut part: Vec<Vec<f64>> =
                    outs.iter().map(|v| vec![f64::NAN; v.len()]).collect();
                let mut o: Vec<&mut [f64]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
                jit.run_f64(id, &ins, &mut o, r.clone()).unwrap();
                for (acc, p) in outs.iter_mut().zip(&part) {
                    acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
            } else {
                let mut o: Vec<&mut [f64]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
                jit.run_f64(id, &ins, &mut o, r.clone()).unwrap();
            }
        }
        for (got, want) in outs.iter().zip(&want) {
            assert_eq!(got.len(), want.len(), "{what}");
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= tol * scale,
                    "{what} {ranges:?}: element {i}: jit {a} vs interpreter {b}"
                );
            }
        }
    }
}
