//! The modules of server/src depend one way: a scan of every `crate::` and `super::` path
//! (comments and unit tests aside) finds no two modules that import each other, directly or
//! in a circle. Keeps the architecture the folders show (io → layers → space → meta) from
//! eroding one convenient import at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`layers::graph`) → the source file.
fn modules(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
            if rel == "main" || rel == "lib" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let module = rel.trim_end_matches("/mod").replace('/', "::");
            out.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
    out
}

/// The code without comments and without the unit-test module at the end.
fn code(source: &str) -> String {
    let source = source.split("#[cfg(test)]\nmod tests").next().unwrap_or(source);
    source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every `prefix` path in `code`, as its `::`-separated segments.
fn paths<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    code.match_indices(prefix).map(move |(i, _)| {
        let rest = &code[i + prefix.len()..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
        rest[..end].split("::").filter(|s| !s.is_empty()).collect()
    })
}

fn dependencies(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (module, source) in mods {
        let code = code(source);
        let mut deps = BTreeSet::new();
        // `super` of a file is its folder's module; of a folder's mod.rs, the folder above.
        let parent = module.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default();
        let candidates = paths(&code, "crate::")
            .map(|p| p.join("::"))
            .chain(paths(&code, "super::").map(|p| format!("{parent}::{}", p.join("::"))));
        for path in candidates {
            let segments: Vec<&str> = path.trim_start_matches("::").split("::").collect();
            if let Some(n) = (1..=segments.len()).rev().find(|n| mods.contains_key(&segments[..*n].join("::"))) {
                deps.insert(segments[..n].join("::"));
            }
        }
        // A folder's mod.rs names its own submodules without a prefix (`pool::Pool`); its
        // re-exports (`pub use pool::Pool;`) are the folder's table of contents, not a use.
        let code: String =
            code.lines().filter(|l| !l.trim_start().starts_with("pub use ")).collect::<Vec<_>>().join("\n");
        for child in mods.keys().filter_map(|m| m.strip_prefix(&format!("{module}::"))).filter(|c| !c.contains("::")) {
            let pattern = format!("{child}::");
            let used = code
                .match_indices(&pattern)
                .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            if used {
                deps.insert(format!("{module}::{child}"));
            }
        }
        deps.remove(module);
        graph.insert(module.clone(), deps);
    }
    graph
}

fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for d in graph.get(&m).into_iter().flatten() {
            if d == to {
                return true;
            }
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    false
}

#[test]
fn no_two_modules_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&root);
    assert!(mods.contains_key("layers::graph") && mods.contains_key("space::pool"), "scan found {mods:?}");
    let graph = dependencies(&mods);
    // The scan sees the imports it must see.
    assert!(graph["io::local"].contains("layers::graph"), "{:?}", graph["io::local"]);
    assert!(graph["space"].contains("space::pool"), "{:?}", graph["space"]);
    let mut cycles = Vec::new();
    for (m, deps) in &graph {
        for d in deps {
            if reaches(&graph, d, m) {
                cycles.push(format!("{m} -> {d} -> … -> {m}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that import each other:\n{}", cycles.join("\n"));
}

#[test]
fn the_layers_run_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = dependencies(&modules(&root));
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    // Lower layers never reach up.
    let order = ["io", "layers", "space", "meta"];
    for (i, lower) in order.iter().enumerate() {
        for (m, deps) in graph.iter().filter(|(m, _)| top(m) == *lower) {
            for d in deps {
                let above = order[..i].iter().any(|u| top(d) == *u) || top(d) == "engine" || top(d) == "nbd";
                assert!(!above, "{m} (in {lower}) imports {d}, which sits above it");
            }
        }
    }
}
