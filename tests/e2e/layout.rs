//! The crate graph (`cargo metadata`): no service crate depends on another, and neither do the libraries
//! the services share (core, runtime, training, proto, clients). Only the CLI and the tests gather the
//! services. The clients of the services live in `ferrotune-clients`, which links only the contracts (no
//! libtorch, no server runtime).

use std::collections::BTreeMap;

/// The crates that host a gRPC service.
const SERVICES: [&str; 5] =
    ["ferrotune-data", "ferrotune-policy", "ferrotune-reward", "ferrotune-merge", "ferrotune-alignment"];

#[test]
fn no_service_crate_depends_on_another() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(&root)
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut graph = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps: Vec<String> = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null()) // normal dependencies; dev-dependencies are tests'
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        graph.insert(p["name"].as_str().unwrap().to_owned(), deps);
    }
    for s in SERVICES {
        assert!(graph.contains_key(s), "{s} is not in the workspace: update SERVICES");
    }
    for (name, deps) in &graph {
        if name == "ferrotune-cli" || name == "ferrotune-tests" {
            continue;
        }
        let bad: Vec<&String> = deps.iter().filter(|d| SERVICES.contains(&d.as_str())).collect();
        assert!(bad.is_empty(), "{name} depends on the service crate(s) {bad:?}");
    }
    let clients = &graph["ferrotune-clients"];
    for lib in ["ferrotune-core", "ferrotune-runtime", "ferrotune-training", "tch", "torch-sys"] {
        assert!(!clients.contains(&lib.to_owned()), "ferrotune-clients depends on {lib}");
    }
    // The orchestrator reaches policy and reward only through their clients.
    assert!(graph["ferrotune-alignment"].contains(&"ferrotune-clients".to_owned()));
    assert!(graph["ferrotune-policy"].contains(&"ferrotune-training".to_owned()));
    assert!(graph["ferrotune-reward"].contains(&"ferrotune-training".to_owned()));
}
