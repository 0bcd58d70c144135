//! Human summaries of checked files: the layer table printed by `cnnc check`
//! (name, op, output shape, parameters, MACs per image), totals, and an estimate
//! of the memory training takes at the file's batch size.

use crate::check::fmt_shape;
use crate::checked::{CheckedFile, CheckedModel, ValueId};
use std::fmt::Write;

/// Batch size assumed for the memory estimate when the file has no `train`.
pub const DEFAULT_BATCH: u64 = 64;

/// The layer table(s) of a checked file, as printed by `cnnc check`.
pub fn render(file: &CheckedFile) -> String {
    let mut out = String::new();
    if let Some(m) = &file.model {
        let (batch, state, note) = match &file.train {
            Some(t) => (t.batch, t.optimizer.state_per_param(), ""),
            None => (
                DEFAULT_BATCH,
                1,
                " (no train section: batch 64, one optimizer state per parameter)",
            ),
        };
        let _ = writeln!(
            out,
            "model {}: input `{}` {}",
            m.name,
            m.input_name,
            fmt_shape(&m.input)
        );
        out.push_str(&table(m));
        let e = estimate(m, batch, state);
        let _ = writeln!(
            out,
            "training memory at batch {batch}{note}: about {}",
            bytes(e.total())
        );
        let _ = writeln!(
            out,
            "  weights {}, gradients {}, optimizer state {}, activations and their gradients {}",
            bytes(e.weights),
            bytes(e.grads),
            bytes(e.optimizer),
            bytes(e.activations)
        );
    }
    for ex in &file.examples {
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "{} on {}", ex.title, fmt_shape(&ex.model.input));
        out.push_str(&table(&ex.model));
    }
    if file.model.is_none() && file.examples.is_empty() && !file.blocks.is_empty() {
        let _ = writeln!(
            out,
            "blocks: {} (no examples to show)",
            file.blocks.join(", ")
        );
    }
    out
}

/// The layer table with totals.
pub fn table(m: &CheckedModel) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    rows.push(["layer", "op", "output", "params", "MACs"].map(String::from));
    for (i, l) in m.layers.iter().enumerate() {
        let mut op = l.op_name.clone();
        if l.frozen && l.op.has_params() {
            op.push_str(" (frozen)");
        }
        let sequential = l.inputs.len() == 1 && l.inputs[0] == ValueId(i);
        let mut name = l.name.clone();
        if !sequential {
            let ins: Vec<String> = l.inputs.iter().map(|v| value_name(m, *v)).collect();
            name = format!("{name} ← {}", ins.join(", "));
        }
        rows.push([
            name,
            op,
            fmt_shape(&l.shape),
            thousands(l.params),
            thousands(l.macs),
        ]);
    }
    let (trainable, frozen) = param_totals(m);
    let macs: u64 = m.layers.iter().map(|l| l.macs).sum();
    rows.push([
        "total".into(),
        String::new(),
        String::new(),
        thousands(trainable + frozen),
        thousands(macs),
    ]);
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let last = rows.len() - 1;
    for (i, r) in rows.iter().enumerate() {
        if i == last {
            let w: usize = widths.iter().sum::<usize>() + 8;
            let _ = writeln!(out, "  {}", "─".repeat(w));
        }
        let mut line = String::from("  ");
        for c in 0..5 {
            let cell = &r[c];
            let pad = widths[c] - cell.chars().count();
            if c >= 3 {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
            if c < 4 {
                line.push_str("  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(
        out,
        "  parameters: {} trainable, {} frozen; {} MACs per image",
        thousands(trainable),
        thousands(frozen),
        si(macs)
    );
    out
}

fn value_name(m: &CheckedModel, v: ValueId) -> String {
    if v.0 == 0 {
        m.input_name.clone()
    } else {
        m.layers[v.0 - 1].name.clone()
    }
}

/// (trainable, frozen) parameter counts.
pub fn param_totals(m: &CheckedModel) -> (u64, u64) {
    let frozen: u64 = m.layers.iter().filter(|l| l.frozen).map(|l| l.params).sum();
    let all: u64 = m.layers.iter().map(|l| l.params).sum();
    (all - frozen, frozen)
}

/// Bytes of memory a training step needs, by kind (f32 everywhere).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations
    }
}

/// Training memory: every parameter, a gradient and `state` optimizer tensors per
/// trainable parameter, and every activation of the batch kept for the backward
/// pass together with its gradient.
pub fn estimate(m: &CheckedModel, batch: u64, state: u64) -> MemoryEstimate {
    let (trainable, frozen) = param_totals(m);
    let per_image: u64 = m.input.iter().product::<u64>()
        + m.layers
            .iter()
            .map(|l| l.shape.iter().product::<u64>())
            .sum::<u64>();
    MemoryEstimate {
        weights: 4 * (trainable + frozen),
        grads: 4 * trainable,
        optimizer: 4 * trainable * state,
        activations: 4 * 2 * batch.saturating_mul(per_image),
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1234567` → `1.23 M`.
pub fn si(n: u64) -> String {
    let x = n as f64;
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1} k", x / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} M", x / 1e6),
        _ => format!("{:.2} G", x / 1e9),
    }
}

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    let x = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", x / 1024.0)
    } else if n < 1 << 30 {
        format!("{:.1} MiB", x / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", x / (1024.0 * 1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(si(12_345), "12.3 k");
        assert_eq!(si(2_500_000), "2.50 M");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
