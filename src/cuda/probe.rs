//! Is a CUDA driver here, with a GPU, and which versions? Looked up with dlopen before cudarc is
//! touched, because cudarc's dynamic loading panics (rather than returning an error) when a
//! library is missing.

use std::fmt;

use libloading::Library;

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

/// What this machine has: the CUDA version the driver supports and its GPUs, and NVRTC's
/// version, each `None` when its library does not load (or does not answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub driver: Option<(i32, i32)>,
    /// GPUs the driver sees (`None`: no driver, or `cuInit` failed)
    pub gpus: Option<i32>,
    pub nvrtc: Option<(i32, i32)>,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.driver {
            Some((major, minor)) => write!(f, "driver for CUDA {major}.{minor}")?,
            None => write!(f, "no CUDA driver")?,
        }
        if let Some(n) = self.gpus {
            write!(f, " with {n} GPU{}", if n == 1 { "" } else { "s" })?;
        }
        match self.nvrtc {
            Some((major, minor)) => write!(f, ", NVRTC {major}.{minor}"),
            None => write!(f, ", no NVRTC"),
        }
    }
}

/// The versions and GPUs found (see [`Found`]).
pub fn found() -> Found {
    let driver_lib = first_loading(LIBRARIES[0].1);
    let nvrtc_lib = first_loading(LIBRARIES[2].1);
    // SAFETY: each symbol is called with the signature NVIDIA's headers give it
    // (`CUresult cuDriverGetVersion(int*)`, `CUresult cuInit(unsigned)`,
    // `CUresult cuDeviceGetCount(int*)`, `nvrtcResult nvrtcVersion(int*, int*)`), on out-pointers
    // to locals; a status other than 0 is read as "no answer".
    unsafe {
        let driver = driver_lib.as_ref().and_then(|lib| {
            let get = lib
                .get::<unsafe extern "C" fn(*mut i32) -> i32>(b"cuDriverGetVersion\0")
                .ok()?;
            let mut v = 0;
            (get(&mut v) == 0).then_some((v / 1000, v % 1000 / 10))
        });
        let gpus = driver_lib.as_ref().and_then(|lib| {
            let init = lib
                .get::<unsafe extern "C" fn(u32) -> i32>(b"cuInit\0")
                .ok()?;
            let count = lib
                .get::<unsafe extern "C" fn(*mut i32) -> i32>(b"cuDeviceGetCount\0")
                .ok()?;
            let mut n = 0;
            (init(0) == 0 && count(&mut n) == 0).then_some(n)
        });
        let nvrtc = nvrtc_lib.as_ref().and_then(|lib| {
            let version = lib
                .get::<unsafe extern "C" fn(*mut i32, *mut i32) -> i32>(b"nvrtcVersion\0")
                .ok()?;
            let (mut major, mut minor) = (0, 0);
            (version(&mut major, &mut minor) == 0).then_some((major, minor))
        });
        Found {
            driver,
            gpus,
            nvrtc,
        }
    }
}

/// Ok when every library loads and the driver sees a GPU; otherwise one line naming what is
/// missing and what was found.
pub fn probe() -> Result<(), String> {
    for (what, names) in LIBRARIES {
        if first_loading(names).is_none() {
            return Err(format!(
                "{what} not found ({}; set LD_LIBRARY_PATH if it is installed elsewhere; found: {})",
                names.join(", "),
                found()
            ));
        }
    }
    let found = found();
    match found.gpus {
        Some(n) if n > 0 => Ok(()),
        _ => Err(format!("no GPU visible to the driver (found: {found})")),
    }
}

/// Ok when NVRTC alone loads: enough to compile the kernels without a device.
pub fn probe_nvrtc() -> Result<(), String> {
    let (what, names) = LIBRARIES[2];
    match first_loading(names) {
        Some(_) => Ok(()),
        None => Err(format!("{what} not found ({})", names.join(", "))),
    }
}

fn first_loading(names: &[&str]) -> Option<Library> {
    names.iter().find_map(|name| {
        // SAFETY: loading runs the library's initialisers; these are NVIDIA's own libraries,
        // loaded the same way cudarc will load them next.
        unsafe { Library::new(name) }.ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_found_reads_as_one_phrase() {
        let none = Found {
            driver: None,
            gpus: None,
            nvrtc: None,
        };
        assert_eq!(none.to_string(), "no CUDA driver, no NVRTC");
        let all = Found {
            driver: Some((13, 0)),
            gpus: Some(1),
            nvrtc: Some((12, 9)),
        };
        assert_eq!(
            all.to_string(),
            "driver for CUDA 13.0 with 1 GPU, NVRTC 12.9"
        );
        // on this machine, whatever it has, the probe's error (if any) is one line
        if let Err(why) = probe() {
            assert!(!why.contains('\n') && why.contains("found: "), "{why}");
        }
    }
}
