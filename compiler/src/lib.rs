//! Shape inference and checking.
