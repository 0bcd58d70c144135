//! The graph verifier, run after every pass in debug and test builds. A failure is
//! a bug in cnnc, never the user's mistake.
//!
//! Invariants:
//! 1. every value id used by a node or an output exists;
//! 2. inputs, params and buffers are never defined by a node; every temporary is
//!    defined by exactly one node;
//! 3. a node only reads values defined before it (so `nodes` is in execution order);
//! 4. each node's output shapes are what its op infers from its input shapes;
//! 5. names of inputs, params and buffers are unique, and so are output names.

use super::*;
use std::collections::HashSet;

/// Checks every invariant; returns all violations.
pub fn verify(g: &Graph) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let n = g.values.len();
    let mut defined: Vec<bool> = g.values.iter().map(|v| v.role != Role::Temp).collect();
    let mut def_count = vec![0usize; n];
    for (k, node) in g.nodes.iter().enumerate() {
        let at = format!("node {k} ({})", node.op.name());
        for i in &node.inputs {
            if i.0 >= n {
                errs.push(format!("{at}: input {} does not exist", i.0));
            } else if !defined[i.0] {
                errs.push(format!(
                    "{at}: reads {} before it is defined",
                    g.values[i.0].name
                ));
            }
        }
        for o in &node.outputs {
            if o.0 >= n {
                errs.push(format!("{at}: output {} does not exist", o.0));
                continue;
            }
            if g.values[o.0].role != Role::Temp {
                errs.push(format!(
                    "{at}: defines {}, which is not a temporary",
                    g.values[o.0].name
                ));
            }
            def_count[o.0] += 1;
            defined[o.0] = true;
        }
        if node.inputs.iter().chain(&node.outputs).any(|v| v.0 >= n) {
            continue;
        }
        let ins: Vec<&Shape> = node.inputs.iter().map(|v| g.shape(*v)).collect();
        match node.op.infer(&ins) {
            Err(e) => errs.push(format!("{at}: {e}")),
            Ok(shapes) => {
                if shapes.len() != node.outputs.len() {
                    errs.push(format!(
                        "{at}: {} outputs, the op has {}",
                        node.outputs.len(),
                        shapes.len()
                    ));
                }
                for (o, s) in node.outputs.iter().zip(&shapes) {
                    if g.shape(*o) != s {
                        errs.push(format!(
                            "{at}: {} is {:?}, the op gives {s:?}",
                            g.values[o.0].name,
                            g.shape(*o)
                        ));
                    }
                }
            }
        }
    }
    for (i, v) in g.values.iter().enumerate() {
        if v.role == Role::Temp && def_count[i] != 1 {
            errs.push(format!(
                "temporary {} is defined {} times",
                v.name, def_count[i]
            ));
        }
    }
    let mut seen = HashSet::new();
    for v in g.values.iter().filter(|v| v.role != Role::Temp) {
        if !seen.insert(&v.name) {
            errs.push(format!("two values are named {}", v.name));
        }
    }
    let mut seen = HashSet::new();
    for (name, v) in &g.outputs {
        if v.0 >= n {
            errs.push(format!("output {name} does not exist"));
        }
        if !seen.insert(name) {
            errs.push(format!("two outputs are named {name}"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Verifies in debug and test builds; a violation is an internal error.
pub fn debug_verify(g: &Graph, pass: &str) {
    if cfg!(debug_assertions) {
        if let Err(errs) = verify(g) {
            panic!(
                "internal error: the graph `{}` is invalid after {pass}:\n  {}",
                g.name,
                errs.join("\n  ")
            );
        }
    }
}
