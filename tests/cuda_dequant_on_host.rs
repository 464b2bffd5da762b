//! The CUDA kernels that expand GGUF blocks to bf16 (kernels/dequant.cu), compiled for the host
//! by the C++ compiler with a shim for CUDA's built-ins and run one thread over every block,
//! against candle's dequantization of the same blocks: every value bit for bit, nothing written
//! outside the range. A GPU is lent to few sessions; this checks the kernels' arithmetic on
//! every machine (the device run checks them again, `slimchat gpu-check --kernels`). Skipped,
//! with a note, where there is no C++ compiler.

use std::path::Path;
use std::process::Command;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slimchat::backend::cpu_ops::to_bf16;

const KERNELS: &str = concat!(
    include_str!("../kernels/common.cuh"),
    include_str!("../kernels/dequant.cu")
);

/// Stand-ins for what NVRTC provides, then the kernels, then a main that runs each kernel named
/// on the command line over `<name>.raw` and compares with `<name>.ref` (bf16, little-endian).
const SHIM: &str = r#"
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
struct Dim { unsigned x, y, z; };
static Dim blockIdx{0, 0, 0}, threadIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
#define __global__
#define __device__
#define __forceinline__ inline
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
static inline float fmaxf(float a, float b) { return a > b ? a : b; }
#include "kernels.cu"
typedef void (*Kernel)(const u8*, long long, bf16*, long long);
static std::vector<unsigned char> slurp(const std::string& p) {
    std::vector<unsigned char> v;
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) return v;
    for (int c; (c = fgetc(f)) != EOF;) v.push_back((unsigned char)c);
    fclose(f);
    return v;
}
int main() {
    struct { const char* name; Kernel k; int per; } ks[] = {
        {"q4_0", dequant_q4_0_bf16, 32}, {"q4_1", dequant_q4_1_bf16, 32},
        {"q5_0", dequant_q5_0_bf16, 32}, {"q5_1", dequant_q5_1_bf16, 32},
        {"q8_0", dequant_q8_0_bf16, 32}, {"q2_k", dequant_q2_k_bf16, 256},
        {"q3_k", dequant_q3_k_bf16, 256}, {"q4_k", dequant_q4_k_bf16, 256},
        {"q5_k", dequant_q5_k_bf16, 256}, {"q6_k", dequant_q6_k_bf16, 256},
        {"f16", dequant_f16_bf16, 1}, {"bf16", dequant_bf16_bf16, 1}, {"f32", dequant_f32_bf16, 1}};
    int failed = 0;
    for (auto& k : ks) {
        auto raw = slurp(std::string(k.name) + ".raw"), ref = slurp(std::string(k.name) + ".ref");
        const size_t n = ref.size() / 2;
        std::vector<bf16> out(n + 2 * k.per, 0x7fc0);  // poisoned one block on each side
        k.k(raw.data(), (long long)(n / k.per), out.data(), k.per);
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
            const bf16 want = (bf16)(ref[2 * i] | (ref[2 * i + 1] << 8));
            if (out[k.per + i] != want && bad++ < 3)
                printf("%s[%zu]: %04x, candle %04x\n", k.name, i, out[k.per + i], want);
        }
        for (int i = 0; i < k.per; i++) bad += (out[i] != 0x7fc0) + (out[k.per + n + i] != 0x7fc0);
        printf("%s: %zu values, %d wrong\n", k.name, n, bad);
        failed += n == 0 || bad != 0;
    }
    return failed;
}
"#;

const TYPES: [(&str, GgmlDType); 13] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("f32", GgmlDType::F32),
];

/// Blocks of each type from candle's quantizer, and candle's values for them in bf16.
fn write_cases(dir: &Path) {
    let mut state = 0x2545_f491u64;
    for (name, dtype) in TYPES {
        let n = 256 * 41;
        let values: Vec<f32> = (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * if i % 97 == 0 { 0.4 } else { 0.05 } // a few outliers, as in trained weights
            })
            .collect();
        let q = QTensor::quantize(
            &Tensor::from_vec(values, (n,), &Device::Cpu).unwrap(),
            dtype,
        )
        .unwrap();
        let expanded = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let reference: Vec<u8> = (to_bf16(&expanded).iter())
            .flat_map(|b| b.to_le_bytes())
            .collect();
        std::fs::write(dir.join(format!("{name}.raw")), q.data().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.ref")), reference).unwrap();
    }
}

#[test]
fn every_dequant_kernel_matches_candle_on_the_host() {
    let Ok(version) = Command::new("c++").arg("--version").output() else {
        eprintln!("no C++ compiler: the dequant kernels are checked on the device only");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kernels.cu"), KERNELS).unwrap();
    std::fs::write(dir.path().join("shim.cpp"), SHIM).unwrap();
    write_cases(dir.path());
    let build = Command::new("c++")
        .args(["-O1", "-std=c++17", "-o", "dequant", "shim.cpp"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(dir.path().join("dequant"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    assert!(run.status.success(), "{report}");
    assert_eq!(report.lines().count(), TYPES.len(), "{report}");
}
