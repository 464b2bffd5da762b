//! Which instruction-set path a hand-dispatched kernel takes, detected once at run time.
//!
//! Kernels that want every path tested (not only the one this CPU picks) take an [`Isa`]
//! argument; `Isa::best()` is what production code passes and `Isa::available()` is what the
//! tests loop over.

/// A code path, from widest to plainest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (+ AVX2, FMA, F16C)
    Avx512,
    /// AVX2 + FMA + F16C
    Avx2,
    /// Portable Rust
    Scalar,
}

impl Isa {
    /// The widest path this CPU runs.
    pub fn best() -> Isa {
        Self::available()[0]
    }

    /// Every path this CPU runs, widest first; `Scalar` is always last.
    pub fn available() -> &'static [Isa] {
        static PATHS: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        PATHS.get_or_init(|| {
            let mut paths = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                use std::is_x86_feature_detected as has;
                let avx2 = has!("avx2") && has!("fma") && has!("f16c");
                if avx2 && has!("avx512f") {
                    paths.push(Isa::Avx512);
                }
                if avx2 {
                    paths.push(Isa::Avx2);
                }
            }
            paths.push(Isa::Scalar);
            paths
        })
    }
}
