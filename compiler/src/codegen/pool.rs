//! Pooling kernels (max, average, global average) and their gradients.

use super::builder::Kb;
use super::Emit;
use crate::ir::{Graph, Node, Shape};

/// The pool kernels (none yet).
#[derive(Clone, Debug, PartialEq)]
pub enum PoolKernel {}

impl PoolKernel {
    pub(crate) fn from_node(_g: &Graph, _node: &Node) -> Option<PoolKernel> {
        None
    }
}

impl Emit for PoolKernel {
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
