//! The module layering `src/lib.rs` documents: its top-level modules are declared in layer
//! order, and each may import only modules declared before it (data flows recipe → model → lora
//! → train → events → sinks; train → checkpoints → fuse → export → eval). This reads every
//! source file, lists the module-level import graph (`just layers` prints it) and fails on an
//! import against that order, which also rules out cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common;

/// The top-level modules in the order `lib.rs` declares them.
fn layer_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

/// Every `crate::<module>` a source text names outside comments, `use crate::{a, b::c}` groups
/// included.
fn crate_references(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    out.insert(module_name(item.trim()));
                }
            } else {
                out.insert(module_name(rest));
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn module_name(path: &str) -> String {
    path.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module → the modules it imports, for every top-level module of `src/`.
fn import_graph(src: &Path, modules: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for module in modules {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
        let mut deps = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            deps.extend(crate_references(&text));
        }
        deps.remove(module);
        graph.insert(module.clone(), deps);
    }
    graph
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = common::root().join("src");
    let order = layer_order(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(
        order.len() > 10,
        "lib.rs declares the top-level modules: {order:?}"
    );
    let graph = import_graph(&src, &order);
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let names: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("{module:>12} -> {}", names.join(" "));
        for dep in deps {
            match rank(dep) {
                Some(r) if r < rank(module).unwrap() => {}
                Some(_) => wrong.push(format!("{module} imports {dep}, a later layer")),
                None => wrong.push(format!(
                    "{module} names crate::{dep}, not a module of lib.rs"
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order of src/lib.rs (docs/architecture.md):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_sees_grouped_and_nested_imports() {
    let refs = crate_references(
        "use crate::{io::raw, quant};\nlet x = crate::model::names::block(0); // crate::cli\n",
    );
    let want: BTreeSet<String> = ["io", "quant", "model"].map(String::from).into();
    assert_eq!(refs, want);
}
