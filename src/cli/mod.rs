//! Command-line verbs. `main.rs` parses arguments and calls into here.
