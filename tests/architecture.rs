//! The shape of `flame-rt/src`, checked: its top-level modules (a file, or a folder with what
//! is inside it) import each other without a circle, so each can be read with only what is
//! below it in mind.
//!
//! Imports are read from the sources: every `crate::x` path, and every `x` in a
//! `crate::{x, y::z}` group, outside comments. `lib.rs` is the root that re-exports everything,
//! not a module of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module name -> the modules it imports, each with the files that do.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module names a source file imports through `crate::`.
fn imports(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => top_level_items(group),
            None => vec![rest],
        };
        for name in names {
            let name: String = (name.trim_start().chars())
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `crate::Error` and the like are the root's re-exports, not modules.
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.insert(name);
            }
        }
    }
    found
}

/// The items of a `{...}` import group (given after its `{`), at its top level.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative.components().next().expect("a path");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" {
            continue;
        }
        let source = std::fs::read_to_string(&file).expect("readable source");
        let node = graph.entry(module.clone()).or_default();
        for import in imports(&source) {
            if import != module {
                (node.entry(import).or_default()).insert(relative.display().to_string());
            }
        }
    }
    graph
}

/// A circle of imports, if there is one: depth-first search for an edge back onto the path.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|edges| edges.keys()) {
            if let Some(circle) = visit(graph, next, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn flame_rt_modules_import_each_other_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flame-rt/src");
    let graph = graph(&src);
    // The reader must see the modules it claims to: the caller's side, the parent's, the
    // runner's, and what they share.
    for module in ["call", "pool", "runner", "protocol", "ticket", "channel"] {
        assert!(
            graph.contains_key(module),
            "no module {module} in {graph:?}"
        );
    }
    assert!(
        graph["call"].contains_key("pool") && graph["pool"].contains_key("protocol"),
        "the import reader missed imports it must see: {graph:?}"
    );
    if let Some(circle) = circle(&graph) {
        let steps: Vec<String> = (circle.windows(2))
            .map(|w| format!("{} -> {} (in {:?})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "flame-rt/src has an import circle; cut one of its edges (a trait the lower module \
             owns, or move the item down):\n  {}",
            steps.join("\n  ")
        );
    }
}

#[test]
fn the_import_reader_finds_groups_paths_and_circles() {
    let source = "use crate::a::X;\n// use crate::commented::Y;\nuse crate::{b, c::{D, E}, Error};\nfn f() { crate::d::g(); }";
    let found: Vec<String> = imports(source).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d"]);

    let mut graph = Graph::new();
    let edge = |graph: &mut Graph, a: &str, b: &str| {
        graph
            .entry(a.into())
            .or_default()
            .entry(b.into())
            .or_default();
    };
    edge(&mut graph, "x", "y");
    edge(&mut graph, "y", "z");
    assert_eq!(circle(&graph), None);
    edge(&mut graph, "z", "x");
    assert_eq!(
        circle(&graph),
        Some(vec!["x".into(), "y".into(), "z".into(), "x".into()])
    );
}
