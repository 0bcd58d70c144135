//! The table of diagnostic codes and their long explanations, for
//! `cnnc explain-code`. Generated at build time by `runtime/build.rs` from the doc
//! comments of the error enums, so each code is documented where it is defined.

/// One diagnostic code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    /// `E0401`, `W0002`, …
    pub code: &'static str,
    /// `error`, `warning` or `advice`.
    pub severity: &'static str,
    /// One line: the message template (`{layer}` stands for a value filled in
    /// when the diagnostic is reported), or the doc's first sentence.
    pub title: &'static str,
    /// The long explanation: what it means, why, an example, the fix.
    pub doc: &'static str,
    /// The source file whose enum defines the code, e.g. `grammar/src/error.rs`.
    pub defined_in: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/codes.rs"));

/// The code named `code`, ignoring ASCII case (`e0401` finds `E0401`).
pub fn find(code: &str) -> Option<&'static Code> {
    let code = code.trim();
    ALL.iter().find(|c| c.code.eq_ignore_ascii_case(code))
}

/// The known code closest to an unknown one, if any is close enough to be a
/// plausible typo (`E401` → `E0401`): at most two edits away.
pub fn suggest(code: &str) -> Option<&'static Code> {
    let wanted = code.trim().to_ascii_uppercase();
    ALL.iter()
        .map(|c| (strsim::levenshtein(&wanted, c.code), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, c)| (*d, c.code))
        .map(|(_, c)| c)
}

/// The long form printed by `cnnc explain-code CODE`.
pub fn explain(c: &Code) -> String {
    // When the title is the doc's first sentence, do not say it twice.
    let doc_one_line = c.doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let header = if doc_one_line.starts_with(c.title) {
        format!("{} ({})", c.code, c.severity)
    } else {
        format!("{} ({}): {}", c.code, c.severity, c.title)
    };
    format!("{header}\n\n{}\n\n(defined in {})\n", c.doc, c.defined_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_well_formed_and_documented() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ALL {
            assert!(seen.insert(c.code), "{} is defined twice", c.code);
            assert!(!c.title.is_empty(), "{} has no title", c.code);
            assert!(!c.doc.is_empty(), "{} has no doc comment", c.code);
            assert!(!c.title.contains('\n'), "{}: title is not one line", c.code);
        }
        assert!(find("E0101").is_some(), "the syntax codes are scanned");
        assert!(find("e0001").is_some(), "lookup ignores case");
    }

    #[test]
    fn explain_does_not_repeat_a_title_taken_from_the_doc() {
        for c in ALL {
            let text = explain(c);
            let first_line = text.lines().next().unwrap_or_default();
            let doc_start: String = c.doc.chars().take(20).collect();
            assert!(
                !(first_line.contains(':') && first_line.contains(&doc_start)),
                "{} says its title twice:\n{text}",
                c.code
            );
        }
    }

    #[test]
    fn suggests_near_codes_only() {
        assert_eq!(suggest("E101").map(|c| c.code), Some("E0101"));
        assert_eq!(suggest("hello"), None);
    }
}
