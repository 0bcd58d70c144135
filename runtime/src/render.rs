//! Rendering front-end diagnostics for people (miette's graphical report) and for
//! editors (JSON, one object per line). (Being written.)

use cnnc_compiler::pipeline::Frontend;

/// Every diagnostic of `fe`, rendered for a terminal `width` columns wide.
pub fn human(_fe: &Frontend, _width: usize, _color: bool) -> String {
    String::new()
}

/// Every diagnostic of `fe` as JSON, one object per line.
pub fn json(_fe: &Frontend) -> String {
    String::new()
}
