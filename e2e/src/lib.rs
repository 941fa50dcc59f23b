//! Placeholder: the end-to-end test support crate lands here.
