//! Is a CUDA driver here? Looked up with dlopen before cudarc is touched, because cudarc's
//! dynamic loading panics (rather than returning an error) when a library is missing.

/// The shared libraries the backend needs, each with the names to try.
const LIBRARIES: [(&str, &[&str]); 3] = [
    ("the CUDA driver", &["libcuda.so.1", "libcuda.so"]),
    (
        "cuBLAS",
        &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
    ),
    (
        "NVRTC",
        &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
    ),
];

/// Ok when every library loads; otherwise one line naming what is missing.
pub fn probe() -> Result<(), String> {
    for (what, names) in LIBRARIES {
        if !names.iter().any(|n| loads(n)) {
            return Err(format!(
                "{what} not found ({}; set LD_LIBRARY_PATH if it is installed elsewhere)",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// Ok when NVRTC alone loads: enough to compile the kernels without a device.
pub fn probe_nvrtc() -> Result<(), String> {
    let (what, names) = LIBRARIES[2];
    if names.iter().any(|n| loads(n)) {
        Ok(())
    } else {
        Err(format!("{what} not found ({})", names.join(", ")))
    }
}

fn loads(name: &str) -> bool {
    // SAFETY: loading runs the library's initialisers; these are NVIDIA's own libraries,
    // loaded the same way cudarc will load them next.
    unsafe { libloading::Library::new(name) }.is_ok()
}
