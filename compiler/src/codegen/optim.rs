//! Optimizer kernels: the parameter update (SGD, Adam, AdamW) with the clip
//! policy's scale applied on the fly, and the gradient sums of squares the clip
//! policy needs.

use super::builder::Kb;
use super::Emit;
use crate::ir::Shape;

/// The optimizer kernels (none yet).
#[derive(Clone, Debug, PartialEq)]
pub enum OptimKernel {}

impl Emit for OptimKernel {
    fn inputs(&self) -> Vec<Shape> {
        match *self {}
    }

    fn outputs(&self) -> Vec<Shape> {
        match *self {}
    }

    fn flops_per_item(&self) -> u64 {
        match *self {}
    }

    fn emit(&self, _kb: &mut Kb) {
        match *self {}
    }
}
