//! Refusing a model that cannot fit in memory before anything is allocated: the
//! check stage's training-memory estimate (`compiler/src/summary.rs`, the figure
//! `cnnc check` prints) against the memory the system has available now.

use cnnc_compiler::checked::{CheckedModel, TrainConfig};
use cnnc_compiler::summary::estimate;
use std::path::Path;

/// Bytes of memory the system can give a new allocation without swapping
/// (`MemAvailable` of `/proc/meminfo`); `None` where that is unknown.
pub fn available_bytes() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string(Path::new("/proc/meminfo")).ok()?)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// A model whose estimated training memory at `batch` exceeds `available`
/// bytes: the message, with the estimate's parts. `None` when it fits (or the
/// available memory is unknown).
pub fn too_big(
    m: &CheckedModel,
    cfg: &TrainConfig,
    batch: u64,
    available: Option<u64>,
) -> Option<String> {
    let available = available?;
    let e = estimate(m, batch, cfg.optimizer.state_per_param());
    let need = e.total();
    if need <= available {
        return None;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Some(format!(
        "training `{}` at batch {batch} needs about {:.1} GiB (activations {:.1} GiB, weights, gradients and \
         optimizer state {:.1} GiB), but this machine has {:.1} GiB available\n\
         help: use a smaller `batch` (the activations grow with it), or a smaller model; \
         `cnnc check` prints the estimate",
        m.name,
        gib(need),
        gib(e.activations),
        gib(e.weights + e.grads + e.optimizer),
        gib(available),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_compiler::pipeline::check_text;

    #[test]
    fn meminfo_is_read_in_kib() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_meminfo(text), Some(2048 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots\n"), None);
    }

    #[test]
    fn a_model_is_refused_only_past_the_available_memory() {
        let fe = check_text(
            "t.cnn",
            "model M {\n  input x: [3, 64, 64]\n  conv c(16, kernel=3, pad=1)\n  global_avg_pool\n  linear fc(2)\n}\n\
             train {\n  data = shapes(n=10, size=64, color=rgb, classes=2)\n  batch = 1000\n  optimizer = sgd(lr=0.1)\n}\n",
        );
        assert!(!fe.has_errors(), "{:?}", fe.diags);
        let c = fe.files[0].checked.as_ref().unwrap();
        let (m, cfg) = (c.model.as_ref().unwrap(), c.train.as_ref().unwrap());
        let need = estimate(m, 1000, cfg.optimizer.state_per_param()).total();
        assert!(too_big(m, cfg, 1000, Some(need)).is_none());
        assert!(too_big(m, cfg, 1000, None).is_none());
        let msg = too_big(m, cfg, 1000, Some(need - 1)).expect("refused");
        assert!(
            msg.contains("batch 1000") && msg.contains("smaller `batch`"),
            "{msg}"
        );
    }
}
