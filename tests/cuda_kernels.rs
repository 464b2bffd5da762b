//! Every CUDA kernel against its CPU reference on random odd-sized inputs (feature `cuda`).
//! Without a driver the tests pass after printing why they were skipped, so
//! `cargo test --features cuda` passes on machines without a GPU; the device machine, which
//! has no cargo, runs the same checks through `slimchat gpu-check --kernels`.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use slimchat::cuda::{check, probe, Gpu};

fn gpu() -> Option<Arc<Gpu>> {
    match probe::probe() {
        Ok(()) => Some(Arc::new(
            Gpu::new(0).expect("a driver is present: the device opens"),
        )),
        Err(why) => {
            eprintln!("skipped: no CUDA device here ({why})");
            None
        }
    }
}

#[test]
fn every_kernel_matches_its_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    for seed in [1, 2] {
        let checks = check::run(gpu.clone(), seed).unwrap();
        let lines = check::table(&checks);
        assert!(checks.iter().all(|c| c.pass), "{}", lines.join("\n"));
    }
}

#[test]
fn the_driver_probe_answers_without_panicking() {
    // without a driver this must be an error line, never a panic inside cudarc
    match probe::probe() {
        Ok(()) => {}
        Err(why) => assert!(why.contains("not found"), "{why}"),
    }
}
