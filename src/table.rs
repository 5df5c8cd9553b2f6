//! Plain-text tables for the command line (`ferry status`, `ferry verify`,
//! `ferry precheck`): bordered, every cell left-aligned, in the style of
//! NebulaGraph's console.
//!
//! In: headers and rows of cells. Out: the rendered text appended to a
//! `String`.

use std::fmt::Write as _;

/// A bordered table, every cell left-aligned (NebulaGraph's console style).
pub fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut rule = String::from("+");
    for width in &widths {
        rule.push_str(&"-".repeat(width + 2));
        rule.push('+');
    }
    rule.push('\n');
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        out.push('|');
        for (cell, width) in cells.zip(&widths) {
            let pad = width - cell.chars().count();
            let _ = write!(out, " {cell}{} |", " ".repeat(pad));
        }
        out.push('\n');
    };
    out.push_str(&rule);
    line(out, &mut headers.iter().copied());
    out.push_str(&rule);
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
    out.push_str(&rule);
}
