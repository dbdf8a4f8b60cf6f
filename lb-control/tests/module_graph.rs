//! The modules' dependency graph, read from the sources: no import cycle between lb-control's
//! top-level modules or between lb-ebpf's modules, and the leaves stay leaves (the store knows
//! nothing of the parts that use it; the domain vocabulary imports nothing of the crate).
//!
//! A module's dependencies are the crate-level names its files mention after `crate::`
//! (`use crate::{a::X, b}` and `crate::c::f()` alike), tests included. A name that is not a
//! module (an item of the crate root, such as lb-ebpf's maps in `main.rs`) counts as the root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

const ROOT: &str = "(crate root)";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-control sits in the workspace")
        .to_owned()
}

/// Every `.rs` file under `dir`, but for `bin/` (other crates, with their own `crate::`).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() && path.file_name().is_some_and(|name| name == "bin") {
            continue;
        }
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The crate's top-level modules: `src/<name>.rs` and `src/<name>/`, binaries' own modules and
/// the crate roots aside.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .expect("src")
        .map(|entry| entry.expect("directory entry").path())
        .filter_map(|path| {
            let name = path.file_stem()?.to_str()?.to_owned();
            let is_module = path.is_dir() || path.extension().is_some_and(|ext| ext == "rs");
            (is_module && !["lib", "main", "bin"].contains(&name.as_str())).then_some(name)
        })
        .collect()
}

/// The source without `//` comments (doc comments mention paths that are not imports).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment of every item named after `crate::` in `text`, braces expanded.
fn crate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level entries of the group: split on commas at depth 0.
            let (mut depth, mut entry) = (0usize, String::new());
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(first_segment(&entry));
                        entry.clear();
                        continue;
                    }
                    _ => {}
                }
                entry.push(ch);
            }
            names.insert(first_segment(&entry));
        } else {
            names.insert(first_segment(rest));
        }
    }
    names.retain(|name| !name.is_empty());
    names
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The graph of `src`'s top-level modules (and the root, where items of it are named).
fn module_graph(src: &Path) -> Graph {
    let modules = top_level_modules(src);
    let mut graph = Graph::new();
    for file in sources(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative.components().next().expect("a path");
        let first = Path::new(first.as_os_str());
        let owner = first
            .file_stem()
            .and_then(|stem| stem.to_str())
            .filter(|stem| modules.contains(*stem))
            .map_or(ROOT.to_owned(), str::to_owned);
        let text = strip_comments(&fs::read_to_string(&file).expect("readable source"));
        let deps = graph.entry(owner.clone()).or_default();
        for name in crate_names(&text) {
            let target = if modules.contains(&name) {
                name
            } else {
                ROOT.to_owned()
            };
            if target != owner {
                deps.insert(target);
            }
        }
    }
    graph
}

/// A cycle of the graph, if there is one (depth-first search).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn describe(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(module, deps)| format!("  {module} -> {deps:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_acyclic(graph: &Graph) {
    if let Some(cycle) = find_cycle(graph) {
        panic!(
            "import cycle {}\nthe graph:\n{}",
            cycle.join(" -> "),
            describe(graph)
        );
    }
}

#[test]
fn lb_control_modules_import_no_cycle() {
    let graph = module_graph(&workspace().join("lb-control/src"));
    assert!(graph.contains_key("backends") && graph.contains_key("store"));
    assert_acyclic(&graph);
}

#[test]
fn lb_ebpf_modules_import_no_cycle() {
    let graph = module_graph(&workspace().join("lb-ebpf/src"));
    assert!(graph.len() > 3, "lb-ebpf's modules were not found");
    assert_acyclic(&graph);
}

#[test]
fn the_store_and_the_vocabulary_import_none_of_their_users() {
    let graph = module_graph(&workspace().join("lb-control/src"));
    let store = &graph["store"];
    for user in ["backends", "dataplane", "gateway", "health", "api", "ha"] {
        assert!(!store.contains(user), "store imports {user}: {store:?}");
    }
    // The upgrade's handover passes sockets and steps; the daemon decides what they mean.
    for leaf in ["model", "section", "methods", "upgrade"] {
        let deps = graph.get(leaf).cloned().unwrap_or_default();
        assert!(deps.is_empty(), "{leaf} imports {deps:?}");
    }
}

#[test]
fn the_ha_role_knows_nothing_of_what_follows_it() {
    // The daemon tells the backend set what the role allows; the role's module stays below
    // the parts it steers, so a role change cannot reach back into them.
    let graph = module_graph(&workspace().join("lb-control/src"));
    let ha = &graph["ha"];
    for part in ["backends", "gateway", "health", "api", "daemon"] {
        assert!(!ha.contains(part), "ha imports {part}: {ha:?}");
    }
}

#[test]
fn crate_names_expand_groups_and_skip_nothing() {
    let text = "use crate::{\n    a::{self, X},\n    b::Y,\n    c,\n};\nlet z = crate::d::f();";
    let names: Vec<String> = crate_names(text).into_iter().collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
}
