//! The module layering the code relies on, checked on the source tree:
//! lower modules never reach up into the ones built on them, so each can be
//! used (and tested) on its own.
//!
//! - the data-path stages (`redis`, `wal`, `record`, `listener`, `ship`,
//!   `apply`) and `verify` do not use the command line (`cli`), the daemons
//!   (`node`) or the admin API (`admin`);
//! - `admin` serves the status types of `status` and does not use `node`
//!   (the node uses `admin` to serve itself: no cycle);
//! - `status` is a leaf: it uses none of `node`, `admin`, `cli`;
//! - `metrics` renders `status` readings and uses nothing else of ferry;
//! - one backoff helper (`src/backoff.rs`);
//! - every `*.md` document cited in `src/` exists.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Files of module `module` (`src/<module>.rs` or `src/<module>/**.rs`).
fn module_files(module: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let dir = src().join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    let file = src().join(format!("{module}.rs"));
    if file.is_file() {
        files.push(file);
    }
    assert!(!files.is_empty(), "module {module} has no files");
    files
}

/// Lines of `module` that use `crate::<other>`.
fn uses(module: &str, other: &str) -> Vec<String> {
    let needles = [format!("crate::{other}::"), format!("crate::{other}::{{")];
    let mut found = Vec::new();
    for file in module_files(module) {
        let text = std::fs::read_to_string(&file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle.as_str())) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn lower_modules_do_not_reach_up() {
    let rules: &[(&str, &[&str])] = &[
        (
            "redis",
            &[
                "cli", "node", "admin", "verify", "apply", "ship", "listener",
            ],
        ),
        (
            "wal",
            &[
                "cli", "node", "admin", "verify", "apply", "ship", "listener",
            ],
        ),
        ("record", &["cli", "node", "admin", "verify"]),
        ("listener", &["cli", "node", "admin", "verify"]),
        ("ship", &["cli", "node", "admin", "verify"]),
        ("apply", &["cli", "node", "admin", "verify"]),
        ("verify", &["cli", "node", "admin"]),
        ("admin", &["node", "cli"]),
        ("status", &["node", "admin", "cli"]),
        (
            "metrics",
            &[
                "node", "admin", "cli", "apply", "ship", "listener", "redis", "wal",
            ],
        ),
        ("table", &["node", "admin", "cli", "verify"]),
        ("backoff", &["node", "admin", "cli"]),
    ];
    let mut violations = Vec::new();
    for (module, forbidden) in rules {
        for other in *forbidden {
            violations.extend(uses(module, other));
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn one_backoff_helper() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut others = Vec::new();
    for file in files {
        if file.ends_with("backoff.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("struct Backoff") || code.contains("* 2).min(") {
                others.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        others.is_empty(),
        "backoff outside src/backoff.rs:\n{}",
        others.join("\n")
    );
}

#[test]
fn cited_documents_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut missing = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            for word in line.split(|c: char| c.is_whitespace() || "()[]`,;:'\"".contains(c)) {
                let word = word.trim_end_matches('.');
                if !word.ends_with(".md") || word.contains("://") {
                    continue;
                }
                let candidates = [root.join(word), root.join("docs").join(word)];
                if !candidates.iter().any(|c| c.is_file()) {
                    missing.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documents cited but absent:\n{}",
        missing.join("\n")
    );
}
