//! Reads the version of the rslock crate this peer is built against from Cargo.lock, so the
//! peer reports the library version it actually runs.

use std::{env, fs, path::Path};

fn main() {
    let lock = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = fs::read_to_string(&lock).expect("Cargo.lock");
    let mut version = None;
    let mut in_rslock = false;
    for line in text.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            in_rslock = false;
        } else if line == "name = \"rslock\"" {
            in_rslock = true;
        } else if in_rslock {
            if let Some(v) = line.strip_prefix("version = \"").and_then(|v| v.strip_suffix('"')) {
                version = Some(v.to_string());
                break;
            }
        }
    }
    let version = version.expect("rslock in Cargo.lock");
    println!("cargo:rustc-env=RSLOCK_VERSION={version}");
}
