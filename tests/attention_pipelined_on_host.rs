//! The pipelined tensor-core prefill attention (kernels/attention_mma_pipelined.cu) compiled for
//! the host by the C++ compiler and run against `CpuOps`: every thread of a CTA a host thread,
//! `mma.sync`, `ldmatrix` (plain and transposed) and the warp votes emulated on the PTX ISA's
//! layouts through memory shared by a warp's 32 threads, `cp.async` a synchronous copy (so the
//! double buffering's barriers are exercised but not its overlap). This checks the fragment
//! mappings, the masking and the tile bookkeeping on every machine; the device run checks the
//! kernel again (`slimchat gpu-check --kernels`). Skipped, with a note, where there is no C++
//! compiler.

use std::path::{Path, PathBuf};
use std::process::Command;

use slimchat::backend::cpu_ops::{to_f32, CpuOps};
use slimchat::backend::ops::{Heads, KvPool, Ops, RowSlice, KV_BLOCK};
use slimchat::backend::ops_check::{rel_err, Rng};

/// What NVRTC and the PTX instructions provide, on the host. A shuffle, a vote, an `mma` or an
/// `ldmatrix` is an exchange through memory between two barriers over the warp's threads.
/// `ldsm_x4`: lane l gives the address of row l % 8 of matrix l / 8; register i of lane l is
/// matrix i's elements (l / 4, 2 (l % 4) ..+1), or with `.trans` (2 (l % 4), l / 4) and
/// (2 (l % 4) + 1, l / 4), the lower-numbered element in the low half. CTAs run one after
/// another.
const PRELUDE: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>
#define HOST_SHIM
struct Dim { unsigned x, y, z; };
static Dim blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
static thread_local Dim threadIdx{0, 0, 0};
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
typedef unsigned short bf16;
typedef unsigned int u32;
alignas(16) static unsigned char pipe_smem[1 << 18];
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
template <typename T, typename Keep> static void atomic_keep(T* p, T v, Keep keep) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (keep(v, old) && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
}
static inline void atomicMax(unsigned* p, unsigned v) { atomic_keep(p, v, [](unsigned a, unsigned b) { return a > b; }); }
static inline void atomicMin(int* p, int v) { atomic_keep(p, v, [](int a, int b) { return a < b; }); }
static std::barrier<>* cta_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
#define __syncthreads() cta_barrier->arrive_and_wait()
static void warp_sync() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }
static float shfl_slots[32][32];
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    shfl_slots[w][lane] = v;
    warp_sync();
    const float r = shfl_slots[w][lane ^ o];
    warp_sync();
    return r;
}
static bool vote_slots[32][32];
static inline bool __any_sync(unsigned, bool p) {
    const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    vote_slots[w][lane] = p;
    warp_sync();
    bool any = false;
    for (int i = 0; i < 32; ++i) any = any || vote_slots[w][i];
    warp_sync();
    return any;
}
static inline bool __all_sync(unsigned m, bool p) { return !__any_sync(m, !p); }
static unsigned mma_a[32][32][4], mma_b[32][32][2];
static inline float half_of(unsigned reg, int hi) { return __uint_as_float(hi ? reg & 0xffff0000u : reg << 16); }
static void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    memcpy(mma_a[w][lane], a, 16);
    memcpy(mma_b[w][lane], b, 8);
    warp_sync();
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double acc = d[i];
        for (int k = 0; k < 16; ++k) {
            // A (row, k): lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
            const float av = half_of(mma_a[w][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k & 1);
            // B (k, col): lane col * 4 + (k % 8) / 2, register (k >= 8)
            const float bv = half_of(mma_b[w][col * 4 + (k % 8) / 2][k >= 8], k & 1);
            acc += (double)av * (double)bv;
        }
        d[i] = (float)acc;
    }
    warp_sync();
}
static const bf16* ldsm_rows[32][32];
static void ldsm(u32 r[4], const bf16* row, bool trans) {
    const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    ldsm_rows[w][lane] = row;
    warp_sync();
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const bf16* const* m = ldsm_rows[w] + 8 * i;  // the 8 rows of matrix i
        const bf16 lo = trans ? m[2 * t][g] : m[g][2 * t];
        const bf16 hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
        r[i] = (u32)lo | ((u32)hi << 16);
    }
    warp_sync();
}
// a "shared address" is a byte pointer on the host
typedef const unsigned char* sptr;
static sptr to_sptr(const void* p) { return (sptr)p; }
static void ldsm_x4(u32 r[4], sptr row) { ldsm(r, (const bf16*)row, false); }
static void ldsm_x4_trans(u32 r[4], sptr row) { ldsm(r, (const bf16*)row, true); }
static void cp_async16(sptr dst, const void* src, bool fill) {
    if (fill) memcpy((void*)dst, src, 16); else memset((void*)dst, 0, 16);
}
static void cp_async_commit() {}
template <int N> static void cp_async_wait() {}
template <typename F> static void launch(unsigned gx, unsigned gy, unsigned threads, F kernel) {
    gridDim = {gx, gy, 1};
    blockDim = {threads, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            memset(pipe_smem, 0xff, sizeof pipe_smem);  // stale shared memory is NaN-ish
            std::barrier<> cta(threads);
            cta_barrier = &cta;
            warp_barriers.clear();
            for (unsigned i = 0; i < threads / 32; ++i)
                warp_barriers.emplace_back(new std::barrier<>(32));
            std::vector<std::thread> ts;
            for (unsigned i = 0; i < threads; ++i)
                ts.emplace_back([i, &kernel] { threadIdx = {i, 0, 0}; kernel(); });
            for (auto& t : ts) t.join();
        }
}
static std::vector<unsigned char> slurp(const std::string& p) {
    std::vector<unsigned char> v;
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) return v;
    for (int c; (c = fgetc(f)) != EOF;) v.push_back((unsigned char)c);
    fclose(f);
    return v;
}
template <typename T> static std::vector<T> as(const std::vector<unsigned char>& b) {
    std::vector<T> v(b.size() / sizeof(T));
    memcpy(v.data(), b.data(), v.size() * sizeof(T));
    return v;
}
"#;

/// One launch over the inputs in files, as `CudaOps::attention_mma_pipelined` makes it (the
/// queries at column offset q_col of rows of q_stride); `out.bin` is the output rows.
const MAIN: &str = r#"
int main() {
    auto q = as<bf16>(slurp("q.bin")), k = as<bf16>(slurp("k.bin")), v = as<bf16>(slurp("v.bin"));
    auto qpos = as<u32>(slurp("qpos.bin")), pos = as<u32>(slurp("pos.bin"));
    auto table = as<u32>(slurp("table.bin"));
    auto d = as<int>(slurp("dims.bin"));  // nq, q_stride, q_col, n_keys, n_heads, n_kv_heads, head_dim, tiles
    const int nq = d[0], stride = d[1], q_col = d[2], n_keys = d[3], nh = d[4], nkv = d[5], hd = d[6], tiles = d[7];
    std::vector<bf16> out((size_t)nq * nh * hd, 0x7fc0);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    const unsigned threads = 32 * (nh / nkv) * tiles, gx = (nq + 16 * tiles - 1) / (16 * tiles);
    launch(gx, nkv, threads, [&] {
        auto f = hd == 64 ? attention_mma_pipelined_hd64_bf16 : attention_mma_pipelined_hd128_bf16;
        f(q.data(), qpos.data(), k.data(), v.data(), pos.data(), table.data(), out.data(), nq,
          stride, q_col, n_keys, nh, nkv, tiles, scale_log2);
    });
    FILE* f = fopen("out.bin", "wb");
    fwrite(out.data(), 2, out.size(), f);
    fclose(f);
    return 0;
}
"#;

fn bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain numbers (u16, u32, i32) viewed as their bytes
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        .to_vec()
}

/// The host program built in `dir`; None, with a note, without a C++ compiler.
fn build(dir: &Path) -> Option<PathBuf> {
    if Command::new("c++").arg("--version").output().is_err() {
        eprintln!("no C++ compiler: the pipelined attention is checked on the device only");
        return None;
    }
    // <cmath> defines INFINITY already; the prelude has the typedefs
    let common = include_str!("../kernels/common.cuh")
        .replace("#define INFINITY", "#define INFINITY_UNUSED")
        .replace("typedef unsigned short bf16;", "")
        .replace("typedef unsigned int u32;", "");
    let kernel = include_str!("../kernels/attention_mma_pipelined.cu");
    let source = format!("{PRELUDE}\n{common}\n{kernel}\n{MAIN}");
    std::fs::write(dir.join("program.cpp"), source).unwrap();
    let out = Command::new("c++")
        .args([
            "-O1",
            "-std=c++20",
            "-pthread",
            "-o",
            "program",
            "program.cpp",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dir.join("program"))
}

#[test]
fn the_pipelined_prefill_attention_matches_the_cpu_reference_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let Some(binary) = build(dir.path()) else {
        return;
    };
    let mut rng = Rng::new(29);
    // (heads, query rows, keys after the last query, query column offset): GQA groups of 4 at
    // head size 128 (two 16-row tiles a head as the backend chooses), 2 at 64 (four), 7 at 128
    // (one), 1 at 64 (eight, 128 rows a CTA), 8 at 128 (one); the queries the last rows of the
    // keys or rows before the last keys (those masked for every query, whole tiles past every
    // query skipped)
    for (n_heads, n_kv_heads, head_dim, nq, after, q_col) in [
        (8usize, 2usize, 128usize, 83usize, 0usize, 0usize),
        (6, 3, 64, 45, 0, 8),
        (14, 2, 128, 37, 21, 0),
        (4, 4, 64, 150, 0, 0),
        (16, 2, 128, 40, 150, 16),
        (8, 2, 128, 50, 200, 0),
    ] {
        let heads = Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let group = n_heads / n_kv_heads;
        let tiles = 8 / group;
        // kept blocks with gaps, then a partial block
        let mut key_pos: Vec<u32> = Vec::new();
        for b in [0u32, 2, 3, 7, 8] {
            key_pos.extend(b * 64..b * 64 + 64);
        }
        key_pos.extend(10 * 64..10 * 64 + 29);
        let n_keys = key_pos.len();
        let end = n_keys - after;
        let q_pos: Vec<u32> = key_pos[end - nq..end].to_vec();
        let kv_dim = heads.kv_dim();
        let slots = n_keys.div_ceil(KV_BLOCK) + 2;
        let mut table: Vec<u32> = (0..slots as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.below(i + 1));
        }
        table.truncate(n_keys.div_ceil(KV_BLOCK));
        let mut pool = KvPool::<CpuOps>::new(&CpuOps, slots, kv_dim).unwrap();
        // rows past the keys hold NaNs and stale positions (0, seen by every query): the
        // kernel must not let them reach an output
        pool.k.fill(0x7fc0);
        pool.v.fill(0x7fc0);
        pool.pos.fill(0);
        for (j, &p) in key_pos.iter().enumerate() {
            let row = table[j / KV_BLOCK] as usize * KV_BLOCK + j % KV_BLOCK;
            pool.k[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            pool.v[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            pool.pos[row] = p;
        }
        let stride = q_col + heads.q_dim() + 2 * kv_dim;
        let q = rng.bf16s(nq * stride, 3.0);
        let at = RowSlice {
            rows: nq,
            stride,
            offset: q_col,
        };
        let mut want = vec![0u16; nq * heads.q_dim()];
        CpuOps
            .attention(&q, at, &q_pos, &pool, &table, n_keys, heads, &mut want)
            .unwrap();
        let dims: Vec<i32> = [
            nq, stride, q_col, n_keys, n_heads, n_kv_heads, head_dim, tiles,
        ]
        .iter()
        .map(|&x| x as i32)
        .collect();
        for (name, data) in [
            ("q.bin", bytes(&q)),
            ("k.bin", bytes(&pool.k)),
            ("v.bin", bytes(&pool.v)),
            ("qpos.bin", bytes(&q_pos)),
            ("pos.bin", bytes(&pool.pos)),
            ("table.bin", bytes(&table)),
            ("dims.bin", bytes(&dims)),
        ] {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let run = Command::new(&binary)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        let raw = std::fs::read(dir.path().join("out.bin")).unwrap();
        let got: Vec<u16> = (raw.chunks_exact(2))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let (got, want) = (to_f32(&got), to_f32(&want));
        assert!(
            got.iter().all(|x| x.is_finite()),
            "every output row written"
        );
        let e = rel_err(&got, &want);
        eprintln!(
            "pipelined attention {n_heads}:{n_kv_heads}x{head_dim}, {nq} rows, {after} keys after: relative error {e:.2e}"
        );
        assert!(e < 1e-2, "{e}");
    }
}
