//! Depthwise convolution kernels (groups = input channels): forward, input
//! gradient and weight gradient, direct loops.

use super::builder::Kb;
use super::Emit;
use crate::ir::{Graph, Node, Shape};

/// The depthwise kernels (none yet).
#[derive(Clone, Debug, PartialEq)]
pub enum DepthwiseKernel {}

impl DepthwiseKernel {
    pub(crate) fn from_node(_g: &Graph, _node: &Node) -> Option<DepthwiseKernel> {
        None
    }
}

impl Emit for DepthwiseKernel {
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
