//! Human summaries of checked files: the layer table printed by `cnnc check`.
//! (Being written.)

use crate::checked::CheckedFile;

/// The layer table(s) of a checked file, as printed by `cnnc check`.
pub fn render(_file: &CheckedFile) -> String {
    String::new()
}
