//! Replays every committed fuzz seed (`fuzz/corpus/<target>/*`) through the same property
//! functions the fuzz targets run, so `cargo test` checks the corpora and any crasher that
//! was fixed stays fixed. See `fuzz/README.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../fuzz/src/properties.rs"]
mod properties;

use std::path::Path;

#[test]
fn every_committed_seed_holds_its_target_properties() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut failed = Vec::new();
    for (target, run) in properties::TARGETS {
        let dir = root.join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 3, "{target}: only {} seeds", seeds.len());
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            if outcome.is_err() {
                failed.push(seed.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "seeds failing their properties: {failed:#?}"
    );
}

#[test]
fn corpora_stay_small() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for (target, _) in properties::TARGETS {
        for entry in std::fs::read_dir(root.join(target)).unwrap() {
            total += entry.unwrap().metadata().unwrap().len();
        }
    }
    assert!(total < 200 * 1024, "committed corpora are {total} bytes");
}
