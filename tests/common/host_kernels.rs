//! CUDA kernels as host programs: the sources built by the C++ compiler after a prelude that
//! provides what NVRTC does, fed and read through files, and paged-attention cases to compare
//! them with `CpuOps`. Used by tests/cuda_kernels_on_host.rs (kernels that run as one thread
//! striding over the grid) and tests/cuda_warp_kernels_on_host.rs (kernels that need a real CTA:
//! [`THREADED_PRELUDE`]).
#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};
use std::process::Command;

use slimchat::backend::cpu_ops::{to_f32, CpuOps};
use slimchat::backend::kv_format::KvDtype;
use slimchat::backend::ops::{Heads, KvPool, Ops, RowSlice, KV_BLOCK};
use slimchat::backend::ops_check::Rng;

/// The host programs' file input: a file's bytes, and those bytes as numbers.
const FILE_INPUT: &str = r#"
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

/// What NVRTC and the PTX instructions provide to kernels that need a real CTA: every thread of
/// a CTA is a host thread, `__syncthreads` a barrier over them; a shuffle, a vote, an `mma` or
/// an `ldmatrix` is an exchange through memory between two barriers over the warp's 32 threads.
/// `mma_16816` is the PTX ISA's m16n8k16 (bf16 in, f32 accumulate) on the ISA's fragment
/// layouts, summed in f64. `ldsm_x4`: lane l gives the address of row l % 8 of matrix l / 8;
/// register i of lane l is matrix i's elements (l / 4, 2 (l % 4) ..+1), or with `.trans`
/// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4), the lower-numbered element in the low half.
/// `cp.async` is a synchronous copy (the double buffering's barriers are exercised, not its
/// overlap). CTAs run one after another, each finding stale shared memory (all ones).
pub const THREADED_PRELUDE: &str = r#"
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
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
alignas(16) static unsigned char pipe_smem[1 << 18];
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
#define __expf expf
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
#define __syncwarp() warp_sync()
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
"#;

/// A host program: `prelude` (what NVRTC provides), [`FILE_INPUT`], kernels/common.cuh, the
/// `kernels` sources, then `main`.
pub fn program_on(prelude: &str, kernels: &[&str], main: &str) -> String {
    // <cmath> defines INFINITY already
    let common = include_str!("../../kernels/common.cuh")
        .replace("#define INFINITY", "#define INFINITY_UNUSED");
    format!(
        "{prelude}\n{FILE_INPUT}\n{common}\n{}\n{main}",
        kernels.join("\n")
    )
}

/// `source` compiled by the host's C++ compiler in `dir` with `flags` (a language standard,
/// threads); None, with a note, without a compiler.
pub fn compile_with(dir: &Path, source: &str, flags: &[&str]) -> Option<PathBuf> {
    if Command::new("c++").arg("--version").output().is_err() {
        eprintln!("no C++ compiler: these kernels are checked on the device only");
        return None;
    }
    std::fs::write(dir.join("program.cpp"), source).unwrap();
    let build = Command::new("c++")
        .arg("-O1")
        .args(flags)
        .args(["-o", "program", "program.cpp"])
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "{stderr}");
    Some(dir.join("program"))
}

/// Run `program` in its folder and read back the bf16 values it wrote to `out.bin`.
pub fn run_for_bf16(program: &Path, args: &[&str]) -> Vec<u16> {
    let dir = program.parent().unwrap();
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let raw = std::fs::read(dir.join("out.bin")).unwrap();
    (raw.chunks_exact(2))
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

pub fn bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain numbers (u16, u32, i32, f32) viewed as their bytes
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        .to_vec()
}

/// Keys at kept blocks `blocks` (64 positions each) and then `tail` positions of block
/// `tail_block`: a pruned layer's keys.
pub fn kept_keys(blocks: &[u32], tail_block: u32, tail: u32) -> Vec<u32> {
    let mut pos: Vec<u32> = Vec::new();
    for &b in blocks {
        pos.extend(b * 64..b * 64 + 64);
    }
    pos.extend(tail_block * 64..tail_block * 64 + tail);
    pos
}

/// One paged attention case: random keys and values at `key_pos` through a shuffled slot table
/// (two spare slots), queries at `q_pos` in rows of q|k|v starting at column `q_col`.
pub struct PagedCase {
    pub heads: Heads,
    pub pool: KvPool<CpuOps>,
    pub table: Vec<u32>,
    pub n_keys: usize,
    pub q: Vec<u16>,
    pub at: RowSlice,
    pub q_pos: Vec<u32>,
}

impl PagedCase {
    /// With `nan_rows`, the pool's rows past the keys hold NaNs at position 0 (seen by every
    /// query): a kernel must not let them reach an output.
    pub fn random(
        rng: &mut Rng,
        heads: Heads,
        key_pos: &[u32],
        q_pos: Vec<u32>,
        q_col: usize,
        nan_rows: bool,
    ) -> Self {
        let n_keys = key_pos.len();
        let kv_dim = heads.kv_dim();
        let slots = n_keys.div_ceil(KV_BLOCK) + 2;
        let mut table: Vec<u32> = (0..slots as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.below(i + 1));
        }
        table.truncate(n_keys.div_ceil(KV_BLOCK));
        let mut pool = KvPool::<CpuOps>::new(&CpuOps, slots, kv_dim).unwrap();
        if nan_rows {
            pool.k.fill(0x7fc0);
            pool.v.fill(0x7fc0);
            pool.pos.fill(0);
        }
        for (j, &p) in key_pos.iter().enumerate() {
            let row = table[j / KV_BLOCK] as usize * KV_BLOCK + j % KV_BLOCK;
            pool.k[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            pool.v[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            pool.pos[row] = p;
        }
        let stride = q_col + heads.q_dim() + 2 * kv_dim;
        let q = rng.bf16s(q_pos.len() * stride, 3.0);
        let at = RowSlice {
            rows: q_pos.len(),
            stride,
            offset: q_col,
        };
        Self {
            heads,
            pool,
            table,
            n_keys,
            q,
            at,
            q_pos,
        }
    }

    /// The same case over a pool of `dtype` (`CpuOps` appends the keys and values in order,
    /// a Q8 layer setting its channel scale) with every 29th key channel 8 times louder (as
    /// trained models' keys have loud channels: Q8's channel scale matters); the rows past the
    /// keys hold NaNs at position 0.
    pub fn retyped(&self, dtype: KvDtype) -> Self {
        let kv_dim = self.heads.kv_dim();
        let mut pool = KvPool::typed(&CpuOps, self.pool.slots, kv_dim, dtype).unwrap();
        pool.k.fill(0x7e00); // an f16 NaN, and a Q8 group's NaN scale
        pool.v.fill(0x7e00);
        pool.pos.fill(0);
        let (mut qkv, mut positions) = (Vec::new(), Vec::new());
        for j in 0..self.n_keys {
            let row = self.table[j / KV_BLOCK] as usize * KV_BLOCK + j % KV_BLOCK;
            let mut key = to_f32(&self.pool.k[row * kv_dim..][..kv_dim]);
            key.iter_mut().step_by(29).for_each(|x| *x *= 8.0);
            qkv.extend_from_slice(&slimchat::backend::cpu_ops::to_bf16(&key));
            qkv.extend_from_slice(&self.pool.v[row * kv_dim..][..kv_dim]);
            positions.push(self.pool.pos[row]);
        }
        let at = RowSlice {
            rows: self.n_keys,
            stride: 2 * kv_dim,
            offset: 0,
        };
        (CpuOps.kv_append(&qkv, at, 0, kv_dim, &positions, &mut pool, &self.table, 0)).unwrap();
        Self {
            heads: self.heads,
            pool,
            table: self.table.clone(),
            n_keys: self.n_keys,
            q: self.q.clone(),
            at: self.at,
            q_pos: self.q_pos.clone(),
        }
    }

    /// `CpuOps`' attention over the case, widened.
    pub fn want(&self) -> Vec<f32> {
        let mut out = vec![0u16; self.q_pos.len() * self.heads.q_dim()];
        CpuOps
            .attention(
                &self.q,
                self.at,
                &self.q_pos,
                &self.pool,
                &self.table,
                self.n_keys,
                self.heads,
                &mut out,
                &slimchat::backend::ops::AttentionContext::NONE,
            )
            .unwrap();
        to_f32(&out)
    }

    /// The case's inputs as the host programs read them (q, k, v, qpos, pos, table, and a Q8
    /// pool's channel scale in kscale, else nothing), and
    /// `dims` in dims.bin.
    pub fn write(&self, dir: &Path, dims: &[usize]) {
        let dims: Vec<i32> = dims.iter().map(|&x| x as i32).collect();
        for (name, data) in [
            ("q.bin", bytes(&self.q)),
            ("k.bin", bytes(&self.pool.k)),
            ("v.bin", bytes(&self.pool.v)),
            ("qpos.bin", bytes(&self.q_pos)),
            ("pos.bin", bytes(&self.pool.pos)),
            ("table.bin", bytes(&self.table)),
            ("kscale.bin", bytes(&self.pool.k_scale)),
            ("dims.bin", bytes(&dims)),
        ] {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
