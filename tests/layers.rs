//! The layer map in `src/lib.rs` is true: every `crate::` path in a module of `src/` names a
//! module of its own layer or of a layer below, as the map lists them, and every module of
//! `src/` is on the map. The map is read from `src/lib.rs` itself, so it cannot drift.
use std::collections::BTreeMap;
use std::path::Path;

/// Module → layer rank, from the `//! - layer: ...` lines of `src/lib.rs` (first is lowest).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut rank = None;
    for line in lib.lines().take_while(|l| l.starts_with("//!")) {
        let text = line.trim_start_matches("//!");
        if text.starts_with(" - ") {
            rank = Some(rank.map_or(0, |r| r + 1));
        } else if !text.starts_with("   ") {
            continue;
        }
        let Some(rank) = rank else { continue };
        for part in text.split("[`").skip(1) {
            if let Some(name) = part.split('`').next() {
                out.insert(name.to_owned(), rank);
            }
        }
    }
    out
}

/// The top-level modules a source file refers to through `crate::`, comments left out.
fn references(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        for part in code.split("crate::").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_its_own_layer_and_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let map = layers(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(map.len() >= 15, "the map in src/lib.rs lists too few modules: {map:?}");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(&rank) = map.get(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is not on the map in src/lib.rs",
                relative.display()
            ));
            continue;
        };
        for used in references(&std::fs::read_to_string(&file).unwrap()) {
            match map.get(&used) {
                Some(&theirs) if theirs > rank => wrong.push(format!(
                    "{}: `{module}` (layer {rank}) imports `{used}` (layer {theirs}), a layer above",
                    relative.display()
                )),
                Some(_) => {}
                None => wrong.push(format!("{}: `crate::{used}` is not on the map", relative.display())),
            }
            if module == "config" && used == "topology" {
                wrong.push(format!(
                    "{}: `config` imports `topology`, which imports `config`",
                    relative.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "the layer map does not hold:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_finds_an_upward_import() {
    let map = layers("//! - data: [`event`]\n//! - shell: [`node`],\n//!   [`cli`]\n");
    assert_eq!(map["event"], 0);
    assert_eq!((map["node"], map["cli"]), (1, 1));
    assert_eq!(references("use crate::node::Node; // crate::cli\n"), vec!["node"]);
}
