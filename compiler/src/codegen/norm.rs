//! Normalisation kernels (batchnorm, groupnorm): statistics, apply, gradients.

use super::builder::Kb;
use super::Emit;
use crate::ir::{Graph, Node, Shape};

/// The norm kernels (none yet).
#[derive(Clone, Debug, PartialEq)]
pub enum NormKernel {}

impl NormKernel {
    pub(crate) fn from_node(_g: &Graph, _node: &Node) -> Option<NormKernel> {
        None
    }
}

impl Emit for NormKernel {
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
