//! CUDA kernels compiled for the host by the C++ compiler with a shim for CUDA's built-ins, run
//! as one thread that strides over the whole grid: those that expand GGUF blocks to bf16
//! (kernels/dequant.cu) against candle's dequantization of the same blocks, every value bit for
//! bit and nothing written outside the range; and the grid-stride row kernels the ops forward
//! added for real models (RoPE in both layouts, Qwen3's per-head norm, biases) against
//! `CpuOps`; the split decode attention of head sizes other than 64 and 128; and the pools of f16
//! and Q8 elements (appends, the Q8 channel scale, widening, block-score keys) against `CpuOps`'
//! pools of the same types, word for word. The kernels that
//! need a real CTA are in tests/cuda_warp_kernels_on_host.rs. A GPU is lent to few sessions;
//! this checks the kernels' arithmetic on every machine (the device run checks them again,
//! `slimchat gpu-check --kernels`). Skipped, with a note, where there is no C++ compiler.

#[path = "common/host_kernels.rs"]
mod host_kernels;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slimchat::backend::cpu_ops::to_bf16;
use slimchat::backend::ops::KV_BLOCK;

use host_kernels::{bytes, compile_with, kept_keys, program_on, run_for_bf16, PagedCase};

/// What NVRTC provides to the kernels, on the host (the C library's maths included): the
/// grid is one thread that strides over all of it.
const PRELUDE: &str = r#"
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
static inline int min(int a, int b) { return a < b ? a : b; }
#define __expf expf
// one thread is the whole CTA: its shared memory is its own, a barrier has nothing to wait for
#define __shared__ static
#define __syncthreads()
#define DEC_DIMS 128
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
"#;

/// The KV element types, before the kernels that read or write a pool.
const KV_TYPES: &str = include_str!("../kernels/kv_types.cuh");

/// A host program: [`PRELUDE`], kernels/common.cuh, the `kernels` sources, then `main`.
fn program(kernels: &[&str], main: &str) -> String {
    program_on(PRELUDE, kernels, main)
}

/// `source` compiled by the host's C++ compiler in `dir` (C++17).
fn compile(dir: &Path, source: &str) -> Option<PathBuf> {
    compile_with(dir, source, &["-std=c++17"])
}

/// The dequant kernels' host program (after [`PRELUDE`] and the kernels): each kernel over
/// `<name>.raw`, compared with `<name>.ref` (bf16, little-endian).
const DEQUANT_MAIN: &str = r#"
typedef void (*Kernel)(const u8*, long long, bf16*, long long);
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
    let dir = tempfile::tempdir().unwrap();
    let source = program(&[include_str!("../kernels/dequant.cu")], DEQUANT_MAIN);
    let Some(binary) = compile(dir.path(), &source) else {
        return;
    };
    write_cases(dir.path());
    let run = Command::new(binary)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    assert!(run.status.success(), "{report}");
    assert_eq!(report.lines().count(), TYPES.len(), "{report}");
}

/// The row kernels' host program: `rope N|X`, `head_norm`, `bias` read their inputs from files
/// (little-endian) and write `out.bin`.
const ROW_SHIM_MAIN: &str = r#"
int main(int argc, char** argv) {
    std::string what = argv[1];
    auto x = as<bf16>(slurp("x.bin"));
    auto dims = as<int>(slurp("dims.bin"));  // rows, stride, col0, heads, head_dim
    if (what == "rope") {
        auto pos = as<u32>(slurp("pos.bin"));
        auto cs = as<float>(slurp("cos.bin")), sn = as<float>(slurp("sin.bin"));
        rope_bf16(x.data(), pos.data(), cs.data(), sn.data(), dims[0], dims[1], dims[2], dims[3],
                  dims[4], atoi(argv[2]));
    } else if (what == "head_norm") {
        auto w = as<bf16>(slurp("w.bin"));
        head_rmsnorm_bf16(x.data(), w.data(), dims[0], dims[1], dims[2], dims[3], dims[4], 1e-6f);
    } else if (what == "bias") {
        auto w = as<bf16>(slurp("w.bin"));
        bias_add_bf16(x.data(), w.data(), dims[0], dims[1]);
    } else return 2;
    FILE* f = fopen("out.bin", "wb");
    fwrite(x.data(), 2, x.size(), f);
    fclose(f);
    return 0;
}
"#;

#[test]
fn the_row_kernels_for_real_models_match_the_cpu_reference_on_the_host() {
    use slimchat::backend::cpu_ops::{plain_rope, rope_tables, to_f32, CpuOps};
    use slimchat::backend::ops::{Ops, RopeLayout, RowSlice};
    use slimchat::backend::ops_check::{rel_err, Rng};

    let dir = tempfile::tempdir().unwrap();
    let norm_rope = include_str!("../kernels/norm_rope.cu");
    // only the grid-stride kernels: the CTA-wide RMSNorm above them needs real threads
    let grid_stride = &norm_rope[norm_rope.find("// In place: within each head").unwrap()..];
    let source = program(
        &[grid_stride, include_str!("../kernels/elementwise.cu")],
        ROW_SHIM_MAIN,
    );
    let Some(binary) = compile(dir.path(), &source) else {
        return;
    };
    let run_kernel = |args: &[&str], files: &[(&str, Vec<u8>)]| -> Vec<f32> {
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        to_f32(&run_for_bf16(&binary, args))
    };
    let mut rng = Rng::new(11);
    let (rows, heads, hd, stride, col0) = (13usize, 3usize, 64usize, 5 * 64 + 7, 64 + 3);
    let at = RowSlice {
        rows,
        stride,
        offset: col0,
    };
    let dims = bytes(&[
        rows as i32,
        stride as i32,
        col0 as i32,
        heads as i32,
        hd as i32,
    ]);
    for (layout, flag) in [(RopeLayout::Normal, "0"), (RopeLayout::Neox, "1")] {
        let x = rng.bf16s(rows * stride, 1.0);
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(3000) as u32).collect();
        let (cos, sin) = rope_tables(&plain_rope(1e6, hd, layout), None, 3000);
        let mut want = x.clone();
        CpuOps
            .rope(&mut want, at, &positions, &cos, &sin, heads, hd, layout)
            .unwrap();
        let got = run_kernel(
            &["rope", flag],
            &[
                ("x.bin", bytes(&x)),
                ("dims.bin", dims.clone()),
                ("pos.bin", bytes(&positions)),
                ("cos.bin", bytes(&cos)),
                ("sin.bin", bytes(&sin)),
            ],
        );
        let e = rel_err(&got, &to_f32(&want));
        assert!(e < 5e-3, "rope {layout:?}: {e}");
    }
    let (x, w) = (rng.bf16s(rows * stride, 2.0), rng.bf16s(hd, 1.0));
    let mut want = x.clone();
    CpuOps
        .head_rmsnorm(&mut want, at, &w, heads, hd, 1e-6)
        .unwrap();
    let got = run_kernel(
        &["head_norm"],
        &[
            ("x.bin", bytes(&x)),
            ("dims.bin", dims.clone()),
            ("w.bin", bytes(&w)),
        ],
    );
    let e = rel_err(&got, &to_f32(&want));
    assert!(e < 5e-3, "head_rmsnorm: {e}");
    let (brows, width) = (7usize, 333usize);
    let (x, b) = (rng.bf16s(brows * width, 1.0), rng.bf16s(width, 0.5));
    let mut want = x.clone();
    CpuOps.add_bias(&mut want, &b, brows, width).unwrap();
    let got = run_kernel(
        &["bias"],
        &[
            ("x.bin", bytes(&x)),
            ("dims.bin", bytes(&[brows as i32, width as i32])),
            ("w.bin", bytes(&b)),
        ],
    );
    assert_eq!(got, to_f32(&want), "bias_add");
}

/// The split decode attention's host program: every (split, KV head) CTA, then every head's
/// combine, over the inputs in files; `out.bin` is the output row.
const DECODE_MAIN: &str = r#"
int main() {
    auto q = as<bf16>(slurp("q.bin")), k = as<bf16>(slurp("k.bin")), v = as<bf16>(slurp("v.bin"));
    auto qpos = as<u32>(slurp("qpos.bin")), pos = as<u32>(slurp("pos.bin"));
    auto table = as<u32>(slurp("table.bin"));
    auto d = as<int>(slurp("dims.bin"));  // n_keys, n_heads, n_kv_heads, head_dim, n_splits, per_split
    const int n_keys = d[0], n_heads = d[1], n_kv = d[2], hd = d[3], n_splits = d[4], per = d[5];
    std::vector<float> pm(n_heads * n_splits), pl(n_heads * n_splits), po(n_heads * n_splits * hd);
    std::vector<bf16> out(n_heads * hd, 0x7fc0);
    gridDim.x = n_splits;
    gridDim.y = n_kv;
    for (unsigned h = 0; h < (unsigned)n_kv; ++h)
        for (unsigned s = 0; s < (unsigned)n_splits; ++s) {
            blockIdx.x = s;
            blockIdx.y = h;
            decode_attention_split_bf16(q.data(), qpos.data(), k.data(), v.data(), pos.data(),
                                        table.data(), pm.data(), pl.data(), po.data(),
                                        n_heads * hd, 0, n_keys, n_heads, n_kv, hd, per,
                                        1.f / sqrtf((float)hd));
        }
    gridDim.x = n_heads;
    gridDim.y = 1;
    for (unsigned h = 0; h < (unsigned)n_heads; ++h) {
        blockIdx.x = h;
        blockIdx.y = 0;
        decode_attention_combine_bf16(pm.data(), pl.data(), po.data(), out.data(), n_splits, hd);
    }
    FILE* f = fopen("out.bin", "wb");
    fwrite(out.data(), 2, out.size(), f);
    fclose(f);
    return 0;
}
"#;

#[test]
fn the_split_decode_attention_matches_the_cpu_reference_on_the_host() {
    use slimchat::backend::cpu_ops::to_f32;
    use slimchat::backend::ops::Heads;
    use slimchat::backend::ops_check::{rel_err, Rng};

    let dir = tempfile::tempdir().unwrap();
    let source = program(
        &[include_str!("../kernels/decode_attention.cu")],
        DECODE_MAIN,
    );
    let Some(binary) = compile(dir.path(), &source) else {
        return;
    };

    let mut rng = Rng::new(5);
    let heads = Heads {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
    };
    // a pruned layer's keys: blocks with gaps; the last 40 keys sit past the query (masked)
    let key_pos = kept_keys(
        &[0, 1, 3, 4, 5, 8, 9, 12, 13, 14, 20, 21, 22, 23, 30, 31],
        32,
        128,
    );
    let q_pos = vec![key_pos[key_pos.len() - 41]];
    let case = PagedCase::random(&mut rng, heads, &key_pos, q_pos, 0, false);
    // as the CUDA backend splits: 3 splits of 384 keys (not a multiple of the tile)
    let (n_keys, n_splits) = (case.n_keys, 3usize);
    let per_split = n_keys.div_ceil(n_splits);
    case.write(dir.path(), &[n_keys, 8, 2, 64, n_splits, per_split]);
    let got = run_for_bf16(&binary, &[]);
    let e = rel_err(&to_f32(&got), &case.want());
    eprintln!("split decode attention against CpuOps: relative error {e:.2e}");
    assert!(e < 5e-3, "{e}");
}

/// The fetch of host-tier blocks (kv_blocks.cu's `kv_fetch_blocks`): the tier's blocks and the
/// pool from files, the pairs (host block, slot), the pool written back.
const FETCH_MAIN: &str = r#"
int main() {
    auto hk = as<uint4>(slurp("hk.bin")), hv = as<uint4>(slurp("hv.bin"));
    auto hp = as<uint4>(slurp("hp.bin"));
    auto k = as<uint4>(slurp("k.bin")), v = as<uint4>(slurp("v.bin")), p = as<uint4>(slurp("p.bin"));
    auto pairs = as<u32>(slurp("pairs.bin"));
    auto d = as<int>(slurp("dims.bin"));  // slot_pieces
    kv_fetch_blocks(hk.data(), hv.data(), hp.data(), k.data(), v.data(), p.data(), pairs.data(),
                    (int)(pairs.size() / 2), d[0]);
    for (auto [name, buf] : {std::pair{"k.out", &k}, {"v.out", &v}, {"p.out", &p}}) {
        FILE* f = fopen(name, "wb");
        fwrite(buf->data(), 16, buf->size(), f);
        fclose(f);
    }
    return 0;
}
"#;

#[test]
fn the_host_tier_fetch_moves_each_block_into_its_slot_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let source = program(
        &[KV_TYPES, include_str!("../kernels/kv_blocks.cu")],
        FETCH_MAIN,
    );
    let Some(binary) = compile(dir.path(), &source) else {
        return;
    };
    // 6 host blocks, a pool of 5 slots, kv_dim 24 (3 pieces of 8 bf16 a row)
    let (kv_dim, host_blocks, slots) = (24usize, 6usize, 5usize);
    let n = KV_BLOCK * kv_dim;
    let hk: Vec<u16> = (0..host_blocks * n).map(|i| i as u16).collect();
    let hv: Vec<u16> = (0..host_blocks * n).map(|i| (i as u16) ^ 0x5555).collect();
    let hp: Vec<u32> = (0..(host_blocks * KV_BLOCK) as u32)
        .map(|i| 1000 + i)
        .collect();
    let (k, v) = (vec![7u16; slots * n], vec![9u16; slots * n]);
    let p = vec![u32::MAX; slots * KV_BLOCK];
    let pairs: [(u32, u32); 3] = [(4, 0), (1, 3), (5, 2)];
    let flat: Vec<u32> = pairs.iter().flat_map(|&(b, d)| [b, d]).collect();
    for (name, data) in [
        ("hk.bin", bytes(&hk)),
        ("hv.bin", bytes(&hv)),
        ("hp.bin", bytes(&hp)),
        ("k.bin", bytes(&k)),
        ("v.bin", bytes(&v)),
        ("p.bin", bytes(&p)),
        ("pairs.bin", bytes(&flat)),
        ("dims.bin", bytes(&[(n / 8) as i32])),
    ] {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let run = Command::new(&binary)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let read16 = |f: &str| -> Vec<u16> {
        let b = std::fs::read(dir.path().join(f)).unwrap();
        b.chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let b = std::fs::read(dir.path().join("p.out")).unwrap();
    let got_p: Vec<u32> = b
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (got_k, got_v) = (read16("k.out"), read16("v.out"));
    let (mut want_k, mut want_v, mut want_p) = (k, v, p);
    for &(b, d) in &pairs {
        let (b, d) = (b as usize, d as usize);
        want_k[d * n..(d + 1) * n].copy_from_slice(&hk[b * n..(b + 1) * n]);
        want_v[d * n..(d + 1) * n].copy_from_slice(&hv[b * n..(b + 1) * n]);
        want_p[d * KV_BLOCK..(d + 1) * KV_BLOCK]
            .copy_from_slice(&hp[b * KV_BLOCK..(b + 1) * KV_BLOCK]);
    }
    // slots 1 and 4 untouched, the others the blocks' keys, values and positions
    assert_eq!(got_k, want_k);
    assert_eq!(got_v, want_v);
    assert_eq!(got_p, want_p);
}

/// The pools' kernels of every KV type (kv_blocks.cu, slim_scores.cu) on one layer: two appends
/// (the first sets a Q8 layer's channel scale), the channel amax of the first, the pool widened
/// to bf16 with the second append's rows read from q's buffer, and the unit keys of the scores.
const KV_TYPES_MAIN: &str = r#"
static void put(const char* name, const void* p, size_t bytes) {
    FILE* f = fopen(name, "wb");
    fwrite(p, 1, bytes, f);
    fclose(f);
}
int main() {
    auto qkv1 = as<bf16>(slurp("qkv1.bin")), qkv2 = as<bf16>(slurp("qkv2.bin"));
    auto pos1 = as<u32>(slurp("pos1.bin")), pos2 = as<u32>(slurp("pos2.bin"));
    auto table = as<u32>(slurp("table.bin"));
    auto ks = as<float>(slurp("kscale.bin"));
    // kind, kv_dim, rows1, rows2, stride, k_col, v_col, slots, unit_rows, unit_size
    auto d = as<int>(slurp("dims.bin"));
    const int kind = d[0], kv_dim = d[1], r1 = d[2], r2 = d[3], st = d[4], kc = d[5], vc = d[6];
    const int slots = d[7], unit_rows = d[8], unit_size = d[9];
    const int words = kv_words(kind, kv_dim);
    std::vector<unsigned short> k((size_t)slots * KV_BLOCK * words, 0),
        v((size_t)slots * KV_BLOCK * words, 0);
    std::vector<u32> p((size_t)slots * KV_BLOCK, 0xffffffffu);
    const float* scale = ks.empty() ? nullptr : ks.data();
    if (kind == KV_Q8) {
        kv_append_q8(qkv1.data(), pos1.data(), k.data(), v.data(), p.data(), table.data(), scale,
                     0, r1, st, kc, vc, kv_dim);
        kv_append_q8(qkv2.data(), pos2.data(), k.data(), v.data(), p.data(), table.data(), scale,
                     r1, r2, st, kc, vc, kv_dim);
    } else {
        auto append = kind == KV_F16 ? kv_append_f16 : kv_append_bf16;
        append(qkv1.data(), pos1.data(), k.data(), v.data(), p.data(), table.data(), scale, 0, r1,
               st, kc, vc, kv_dim);
        append(qkv2.data(), pos2.data(), k.data(), v.data(), p.data(), table.data(), scale, r1, r2,
               st, kc, vc, kv_dim);
    }
    put("k.out", k.data(), k.size() * 2);
    put("v.out", v.data(), v.size() * 2);
    put("p.out", p.data(), p.size() * 4);
    std::vector<float> amax(kv_dim, NAN);
    key_channel_amax(qkv1.data(), amax.data(), r1, st, kc, kv_dim);
    put("amax.out", amax.data(), amax.size() * 4);
    const int n = r1 + r2, blocks = (n + KV_BLOCK - 1) / KV_BLOCK;
    std::vector<bf16> wk((size_t)blocks * KV_BLOCK * kv_dim, 0x7fc0),
        wv((size_t)blocks * KV_BLOCK * kv_dim, 0x7fc0);
    std::vector<u32> wp((size_t)blocks * KV_BLOCK, 7);
    kv_widen_bf16(k.data(), v.data(), p.data(), table.data(), scale, kind, n, kv_dim,
                  qkv2.data(), pos2.data(), r2, st, kc, vc, wk.data(), wv.data(), wp.data());
    put("wk.out", wk.data(), (size_t)n * kv_dim * 2);
    put("wv.out", wv.data(), (size_t)n * kv_dim * 2);
    put("wp.out", wp.data(), (size_t)n * 4);
    const int units = (unit_rows + unit_size - 1) / unit_size;
    std::vector<float> uk((size_t)units * kv_dim, NAN);
    unit_keys_bf16(k.data(), table.data(), scale, kind, uk.data(), unit_rows, unit_size, kv_dim);
    put("uk.out", uk.data(), uk.size() * 4);
    return 0;
}
"#;

#[test]
fn pools_of_every_kv_type_are_written_widened_and_scored_as_on_the_cpu_on_the_host() {
    use slimchat::backend::cpu_ops::CpuOps;
    use slimchat::backend::kv_format::{key_scale_from_amax, unscale_keys, KvDtype};
    use slimchat::backend::ops::{KvPool, Ops, RowSlice};
    use slimchat::backend::ops_check::{rel_err, Rng};

    let dir = tempfile::tempdir().unwrap();
    let source = program(
        &[
            KV_TYPES,
            include_str!("../kernels/kv_blocks.cu"),
            include_str!("../kernels/slim_scores.cu"),
        ],
        KV_TYPES_MAIN,
    );
    let Some(binary) = compile(dir.path(), &source) else {
        return;
    };
    let mut rng = Rng::new(23);
    // three heads of 64 (the default model's), a prompt of 70 rows then a step of 9 that
    // crosses into a second block; the table shuffled over four slots
    let (kv_dim, q_dim, r1, r2) = (192usize, 64usize, 70usize, 9usize);
    let (k_col, v_col, stride) = (q_dim, q_dim + kv_dim, q_dim + 2 * kv_dim + 3);
    let (slots, table) = (4usize, vec![2u32, 0]);
    // keys with loud channels, as trained models' are: the channel scale is what Q8 needs
    let rows = |rng: &mut Rng, n: usize| -> Vec<u16> {
        let mut x = rng.f32s(n * stride, 1.0);
        for (i, v) in x.iter_mut().enumerate() {
            let c = i % stride;
            if c >= k_col && c < v_col && (c - k_col) % 29 == 3 {
                *v *= 40.0;
            }
        }
        to_bf16(&x)
    };
    let (qkv1, qkv2) = (rows(&mut rng, r1), rows(&mut rng, r2));
    let pos1: Vec<u32> = (0..r1 as u32).map(|p| 3 * p).collect();
    let pos2: Vec<u32> = (0..r2 as u32).map(|p| 300 + p).collect();
    let (unit_rows, unit_size) = (72usize, 8usize);
    for (kind, dtype) in [(0, KvDtype::Bf16), (1, KvDtype::F16), (2, KvDtype::Q8)] {
        let cpu = CpuOps;
        let mut pool = KvPool::typed(&cpu, slots, kv_dim, dtype).unwrap();
        let at = |rows| RowSlice {
            rows,
            stride,
            offset: 0,
        };
        cpu.kv_append(&qkv1, at(r1), k_col, v_col, &pos1, &mut pool, &table, 0)
            .unwrap();
        cpu.kv_append(&qkv2, at(r2), k_col, v_col, &pos2, &mut pool, &table, r1)
            .unwrap();
        let dims: Vec<i32> = [
            kind, kv_dim, r1, r2, stride, k_col, v_col, slots, unit_rows, unit_size,
        ]
        .iter()
        .map(|&x| x as i32)
        .collect();
        for (name, data) in [
            ("qkv1.bin", bytes(&qkv1)),
            ("qkv2.bin", bytes(&qkv2)),
            ("pos1.bin", bytes(&pos1)),
            ("pos2.bin", bytes(&pos2)),
            ("table.bin", bytes(&table)),
            ("kscale.bin", bytes(&pool.k_scale)),
            ("dims.bin", bytes(&dims)),
        ] {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let run = Command::new(&binary)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(run.status.success(), "{dtype:?}: {run:?}");
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let u16s = |b: Vec<u8>| -> Vec<u16> {
            b.chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let u32s = |b: Vec<u8>| -> Vec<u32> {
            b.chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        // the pool, word for word what the CPU stores
        assert_eq!(u16s(read("k.out")), pool.k, "{dtype:?} keys");
        assert_eq!(u16s(read("v.out")), pool.v, "{dtype:?} values");
        assert_eq!(u32s(read("p.out")), pool.pos, "{dtype:?} positions");
        // the first append's channel maxima give the CPU's channel scale
        if dtype == KvDtype::Q8 {
            let scale = key_scale_from_amax(f32s(read("amax.out")));
            assert_eq!(scale, pool.k_scale, "channel scale");
            assert!(scale.iter().any(|&s| s > 10.0), "the loud channels set it");
        }
        // widened: the first append's rows from the pool (keys unscaled), the second's as
        // they were computed
        let words = pool.row_words();
        let (wk, wv, wp) = (
            u16s(read("wk.out")),
            u16s(read("wv.out")),
            u32s(read("wp.out")),
        );
        for s in 0..r1 + r2 {
            let row = table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK;
            assert_eq!(wp[s], pool.pos[row], "position of row {s}");
            let (want_k, want_v) = if s < r1 {
                let (mut k, mut v) = (vec![0f32; kv_dim], vec![0f32; kv_dim]);
                dtype.decode(&pool.k[row * words..][..words], &mut k);
                dtype.decode(&pool.v[row * words..][..words], &mut v);
                unscale_keys(&mut k, &pool.k_scale);
                (to_bf16(&k), to_bf16(&v))
            } else {
                let r = &qkv2[(s - r1) * stride..];
                (r[k_col..][..kv_dim].to_vec(), r[v_col..][..kv_dim].to_vec())
            };
            assert_eq!(
                wk[s * kv_dim..][..kv_dim],
                want_k[..],
                "{dtype:?} key row {s}"
            );
            assert_eq!(
                wv[s * kv_dim..][..kv_dim],
                want_v[..],
                "{dtype:?} value row {s}"
            );
        }
        // the block scores' unit keys
        let mut want = vec![0f32; unit_rows.div_ceil(unit_size) * kv_dim];
        cpu.unit_keys(&pool, &table, unit_rows, unit_size, &mut want)
            .unwrap();
        let e = rel_err(&f32s(read("uk.out")), &want);
        assert!(e < 1e-6, "{dtype:?} unit keys: {e}");
    }
}
