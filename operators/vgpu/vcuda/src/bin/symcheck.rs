//! Checks a driver's exported symbols against the interception table.
//!
//! Feed it the names a real `libcuda.so.1` exports, one per line (for example
//! `nm -D --defined-only libcuda.so.1 | awk '{print $3}'`). It prints every exported variant of
//! an intercepted family that the library neither intercepts nor deliberately passes through,
//! and exits 1 if there is any: a newer driver added a variant the table must learn.

#[path = "../symbols.rs"]
#[allow(dead_code)]
mod symbols;

use std::io::Read;

fn main() {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read symbol names: {e}");
        std::process::exit(2);
    }
    // accept raw names or `nm` lines, and `name@VERSION` forms
    let names: Vec<&str> = input
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    let missing = symbols::missing_variants(names.iter().copied());
    let covered = symbols::SYMBOLS
        .iter()
        .filter(|s| names.contains(&s.name))
        .count();
    println!(
        "{} exported names, {covered} of {} intercepted symbols present",
        names.len(),
        symbols::SYMBOLS.len()
    );
    for m in &missing {
        println!("MISSING {m}");
    }
    if !missing.is_empty() {
        std::process::exit(1);
    }
}
