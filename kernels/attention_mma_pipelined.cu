// Prefill attention on tensor cores, pipelined: the same arguments and results as
// attention_mma.cu (causal over explicit positions, grouped-query heads, keys read from the paged
// KV cache through a slot table, bf16 in, f32 accumulate with mma.sync m16n8k16, flash-style
// online softmax), rebuilt so the tensor cores are not left waiting:
//
// - K/V tiles (one KV_BLOCK = 64-key slot of the pool each) are copied to shared memory by
//   cp.async (16 bytes a thread per instruction, .cg: through L2 only), double-buffered: tile
//   i + 1 is in flight while the warps compute on tile i (one commit group per tile, issued
//   right after the one barrier per tile, which also frees the buffer it fills).
// - Fragments are read from shared memory by ldmatrix: Q's A fragments and K's B fragments
//   with ldmatrix.x4, V's B fragments with ldmatrix.x4.trans (V is stored key-major like K, and
//   P V needs it channel-major: the transposing load does that in the load).
// - Shared rows are padded to HD + 8 bf16 (a multiple of 16 bytes, and 16 bytes more than a
//   multiple of 128): the 8 rows one 8x8 matrix of an ldmatrix reads start in 8 distinct
//   16-byte bank groups, so each of its phases is conflict-free.
// - Q lives in shared memory (each warp its own 16 rows), not in registers: that keeps a
//   thread at 128 registers (O 64 floats at head size 128, S 16, fragments; ptxas of CUDA 13
//   for sm_90 spills 8 bytes at head size 128, none at 64), so two CTAs of 8 warps fit an SM
//   (2 x 103 KB of shared memory at head size 128, of 228 KB on an H100/H200, and 2 x 256 x
//   128 registers fill the register file). Re-reading Q adds half of K's traffic to S = Q Kᵀ.
// - Work that changes nothing is skipped, by warp-uniform tests: a tile none of the warp's
//   rows sees (its first key past them all), the mask where all of a full tile is visible to
//   all of the warp's rows (its last key at or before them all: most tiles of a long prefill),
//   the rescale of O where no row's maximum moved. Positions ascend along the table and
//   within a slot (as attention_mma.cu's early break assumes too).
// - The heaviest row blocks launch first (row blocks in reverse order of blockIdx.x): under the
//   causal mask the last rows see the most keys, and the light early blocks then fill the
//   tail of the grid.
//
// A CTA is one KV head and `tiles` 16-row tiles of query rows for each of the `group` query
// heads that read it (warps = group * tiles <= PIPE_WARPS): every K/V tile is loaded once for
// all of them. Warp w owns query head kv_head * group + w / tiles and rows
// row0 + 16 * (w % tiles) ..+16. Per PIPE_STEP = 32 keys a warp computes S = Q Kᵀ (4 n-tiles of
// 8 keys, head_dim / 16 k-steps), masks by position, updates each row's running max and sum,
// rounds P to bf16 and adds P V (head_dim / 8 n-tiles, 2 k-steps of 16 keys) to its f32 output.
//
// Fragments (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, f32):  c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// ldmatrix.m8n8.x4 (PTX ISA): lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16
// bytes each), and register i of lane l receives matrix i's elements (l / 4, 2 (l % 4) ..+1);
// with .trans it receives (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) instead. So:
//   Q (rows x channels, row-major): matrices (rows 0-7, ch c..), (rows 8-15, ch c..),
//     (rows 0-7, ch c+8..), (rows 8-15, ch c+8..) are a0..a3 of the k-step at channel c:
//     lane l points at row l % 16, channel c + 8 (l / 16).
//   K (keys x channels): B of S = Q Kᵀ is (k = channel, n = key), b0 = (key g, ch 2t..2t+1),
//     which is an untransposed 8x8 matrix of 8 keys by 8 channels. Matrices (keys n..n+7) at
//     channels c, c+8, c+16, c+24 are b0, b1 of the k-step at c and b0, b1 of the one at c+16:
//     lane l points at key n + l % 8, channel c + 8 (l / 8).
//   V (keys x channels): B of P V is (k = key, n = channel), b0 = (keys 2t..2t+1, ch g): the
//     transpose of an 8x8 matrix of 8 keys by 8 channels. Matrices (keys k..k+7, ch c..),
//     (keys k+8.., ch c..), (keys k.., ch c+8..), (keys k+8.., ch c+8..) are b0, b1 of n-tile
//     c and b0, b1 of n-tile c+8: lane l points at key k + l % 8 + 8 ((l / 8) % 2), channel
//     c + 8 (l / 16).
// A row's scores and outputs sit in the 4 lanes of its quad, reduced with two shuffles.

#define PIPE_WARPS 8
#define PIPE_STEP 32

#ifndef HOST_SHIM
extern __shared__ __align__(16) unsigned char pipe_smem[];

// four 8x8 b16 matrices: lane l gives the address of row l % 8 of matrix l / 8
__device__ __forceinline__ void ldsm_x4(u32 r[4], sptr row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}

// the same, each matrix transposed on the way
__device__ __forceinline__ void ldsm_x4_trans(u32 r[4], sptr row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
#endif

// Dynamic shared memory, in this order (LD = HD + 8 bf16 a row):
//   qs:   (warps * 16, LD) bf16, warp w's query rows at rows 16w..
//   ks:   (2, KV_BLOCK, LD) bf16, the two K buffers
//   vs:   (2, KV_BLOCK, LD) bf16
//   kpos: (2, KV_BLOCK) u32, the keys' positions
// = (16 * warps + 4 * KV_BLOCK) * LD * 2 + 8 * KV_BLOCK bytes (prefill_attention.rs computes
// the same).
//
// grid (ceil(nq / (16 * tiles)), n_kv_heads), block (32 * group * tiles)
// q: (nq, q_stride) bf16, head h at columns q_col + h * HD (post-RoPE; q_stride and q_col
// multiples of 8, so a row's 16-byte pieces are aligned); q_pos: (nq) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, n_kv_heads * HD) bf16; pos_pool: (n_slots, KV_BLOCK)
// table: (ceil(n_keys / KV_BLOCK)) u32, the slots in key order (ascending positions); all full
// but the last
// out: (nq, n_heads * HD) bf16
// scale_log2: log2(e) / sqrt(HD)
template <int HD>
__device__ __forceinline__ void attention_mma_pipelined(
    const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool, const u32* pos_pool,
    const u32* table, bf16* out, int nq, int q_stride, int q_col, int n_keys, int n_heads,
    int n_kv_heads, int tiles, float scale_log2) {
    constexpr int LD = HD + 8;  // shared row stride, bf16
    constexpr int CH = HD / 8;  // 16-byte pieces of a row
    constexpr int KSTEPS = HD / 16, NT = HD / 8;
    constexpr int SN = PIPE_STEP / 8;   // n-tiles of S per step
    constexpr int SK = PIPE_STEP / 16;  // k-steps of P V per step
    constexpr int BUF = KV_BLOCK * LD * 2;  // bytes of one K (or V) buffer
    __shared__ u32 cta_max_pos;
    __shared__ int live_tiles;

    const int warps = blockDim.x >> 5;
    bf16* qs = (bf16*)pipe_smem;
    bf16* ks = qs + warps * 16 * LD;
    bf16* vs = ks + 2 * KV_BLOCK * LD;
    u32* kpos = (u32*)(vs + 2 * KV_BLOCK * LD);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = n_heads / n_kv_heads, kv_head = blockIdx.y;
    const int head = kv_head * group + warp / tiles;
    const int rows_per_cta = 16 * tiles;
    const int row0 = (gridDim.x - 1 - blockIdx.x) * rows_per_cta;  // heaviest blocks first
    const int wrow = row0 + 16 * (warp % tiles);  // the warp's first query row
    const int kv_dim = n_kv_heads * HD;
    const int r_lo = wrow + g, r_hi = wrow + g + 8;  // this lane's two rows
    const bool ok_lo = r_lo < nq, ok_hi = r_hi < nq;
    const u32 pos_lo = ok_lo ? q_pos[r_lo] : 0u, pos_hi = ok_hi ? q_pos[r_hi] : 0u;
    const int n_tiles = (n_keys + KV_BLOCK - 1) / KV_BLOCK;

    if (threadIdx.x == 0) {
        cta_max_pos = 0;
        live_tiles = n_tiles;
    }
    __syncthreads();
    // the CTA's largest query position, then the first tile that starts past it: no row of
    // the CTA sees that tile or any later one (positions ascend along the table)
    for (int r = threadIdx.x; r < rows_per_cta && row0 + r < nq; r += blockDim.x)
        atomicMax(&cta_max_pos, q_pos[row0 + r]);
    __syncthreads();
    const u32 cta_max = cta_max_pos;
    for (int i = threadIdx.x; i < n_tiles; i += blockDim.x)
        if (pos_pool[(size_t)table[i] * KV_BLOCK] > cta_max) atomicMin(&live_tiles, i);
    __syncthreads();
    const int n_live = live_tiles;

    // the warp's 16 query rows to shared memory (rows past nq are zeros)
    bf16* qw = qs + warp * 16 * LD;
    for (int c = lane; c < 16 * CH; c += 32) {
        const int r = c / CH, piece = c % CH, row = wrow + r;
        const bool in = row < nq;
        const bf16* src = q + (size_t)(in ? row : 0) * q_stride + q_col + head * HD + 8 * piece;
        cp_async16(to_sptr(qw + r * LD + 8 * piece), src, in);
    }
    // one K/V tile and its keys' positions to buffer `buf`; keys past the end are zeros (their
    // positions are whatever the slot holds: the mask tests the key index as well)
    auto load_tile = [&](int tile, int buf) {
        const size_t slot = table[tile];
        const int tile_keys = min(KV_BLOCK, n_keys - tile * KV_BLOCK);
        const bf16* kg = k_pool + slot * KV_BLOCK * kv_dim + kv_head * HD;
        const bf16* vg = v_pool + slot * KV_BLOCK * kv_dim + kv_head * HD;
        const sptr kd = to_sptr(ks) + buf * BUF, vd = to_sptr(vs) + buf * BUF;
        for (int c = threadIdx.x; c < KV_BLOCK * CH; c += blockDim.x) {
            const int key = c / CH, piece = c % CH;
            const bool in = key < tile_keys;
            const size_t at = (size_t)key * kv_dim + 8 * piece;  // inside the slot either way
            const int to = 2 * (key * LD + 8 * piece);
            cp_async16(kd + to, kg + at, in);
            cp_async16(vd + to, vg + at, in);
        }
        if (threadIdx.x < KV_BLOCK / 4)
            cp_async16(to_sptr(kpos + buf * KV_BLOCK + 4 * threadIdx.x),
                       pos_pool + slot * KV_BLOCK + 4 * threadIdx.x, true);
    };
    if (n_live > 0) load_tile(0, 0);
    cp_async_commit();  // group 0: the queries and tile 0

    // running max (log2 units) and this lane's share of the row sums, rows g and g + 8
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    // this lane's ldmatrix rows (see the header), as shared byte addresses: Q's row, K's and
    // V's keys in buffer 0 (buffer 1 is BUF bytes further)
    const sptr q_frag = to_sptr(qw + (lane & 15) * LD + 8 * (lane >> 4));
    const sptr k_frag = to_sptr(ks + (lane & 7) * LD + 8 * (lane >> 3));
    const sptr v_frag = to_sptr(vs + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * (lane >> 4));

    for (int tile = 0; tile < n_live; ++tile) {
        const int buf = tile & 1;
        // the only group in flight is this tile's (and the queries', at tile 0); after the
        // barrier every thread's pieces of it have landed, and every warp is done with the
        // previous tile, whose buffer the next tile then fills while this one is computed
        cp_async_wait<0>();
        __syncthreads();
        if (tile + 1 < n_live) {
            load_tile(tile + 1, buf ^ 1);
            cp_async_commit();
        }

        const sptr kb = k_frag + buf * BUF, vb = v_frag + buf * BUF;
        const u32* pb = kpos + buf * KV_BLOCK;
        const int tile_keys = min(KV_BLOCK, n_keys - tile * KV_BLOCK);
        // a warp none of whose rows sees any key of the tile skips it (its state would not
        // change); the tile's first key has its smallest position
        const u32 first = pb[0];
        const bool sees = (ok_lo && first <= pos_lo) || (ok_hi && first <= pos_hi);
        // and where the whole tile is visible to all of the warp's rows (a full tile, its last
        // key at or before every row: most tiles of a long prefill) the mask is skipped
        const u32 last = pb[KV_BLOCK - 1];
        const bool all_visible =
            __all_sync(0xffffffffu, tile_keys == KV_BLOCK && ok_lo && ok_hi && last <= pos_lo &&
                                        last <= pos_hi);
        if (__any_sync(0xffffffffu, sees)) {
#pragma unroll 1
            for (int h0 = 0; h0 < KV_BLOCK; h0 += PIPE_STEP) {
                // S = Q Kᵀ for PIPE_STEP keys: n-tile j holds keys h0 + 8j ..+8
                float s[SN][4];
#pragma unroll
                for (int j = 0; j < SN; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    u32 qa0[4], qa1[4];
                    ldsm_x4(qa0, q_frag + 2 * 16 * kk);
                    ldsm_x4(qa1, q_frag + 2 * 16 * (kk + 1));
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
                        u32 kf[4];  // b0, b1 of k-step kk, then of k-step kk + 1
                        ldsm_x4(kf, kb + 2 * ((h0 + 8 * j) * LD + 16 * kk));
                        mma_16816(s[j], qa0, kf);
                        mma_16816(s[j], qa1, kf + 2);
                    }
                }
                // mask by position (and keys past the tile's end); then the rows' maxima of
                // the raw scores (the scale is positive, so it commutes with the max)
                if (!all_visible) {
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int key = h0 + 8 * j + 2 * t + c;
                            const u32 kp = pb[key];
                            const bool in = key < tile_keys;
                            if (!(in && ok_lo && kp <= pos_lo)) s[j][c] = -INFINITY;
                            if (!(in && ok_hi && kp <= pos_hi)) s[j][2 + c] = -INFINITY;
                        }
                    }
                }
                float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
                for (int j = 0; j < SN; ++j) {
                    mx_lo = fmaxf(mx_lo, fmaxf(s[j][0], s[j][1]));
                    mx_hi = fmaxf(mx_hi, fmaxf(s[j][2], s[j][3]));
                }
                const float new_lo = fmaxf(m_lo, quad_max(mx_lo) * scale_log2);
                const float new_hi = fmaxf(m_hi, quad_max(mx_hi) * scale_log2);
                // a row that has seen no key yet keeps m = -inf, its p = 0 and its sums as
                // they are
                const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
                const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
                const float corr_lo = exp2f(m_lo - base_lo), corr_hi = exp2f(m_hi - base_hi);
                m_lo = new_lo;
                m_hi = new_hi;
                float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
                for (int j = 0; j < SN; ++j) {
                    s[j][0] = exp2f(fmaf(s[j][0], scale_log2, -base_lo));
                    s[j][1] = exp2f(fmaf(s[j][1], scale_log2, -base_lo));
                    s[j][2] = exp2f(fmaf(s[j][2], scale_log2, -base_hi));
                    s[j][3] = exp2f(fmaf(s[j][3], scale_log2, -base_hi));
                    sum_lo += s[j][0] + s[j][1];
                    sum_hi += s[j][2] + s[j][3];
                }
                l_lo = l_lo * corr_lo + sum_lo;
                l_hi = l_hi * corr_hi + sum_hi;
                // once the rows' maxima settle the factors are all 1: skip the rescale then
                if (__any_sync(0xffffffffu, corr_lo != 1.f || corr_hi != 1.f)) {
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        o[n][0] *= corr_lo;
                        o[n][1] *= corr_lo;
                        o[n][2] *= corr_hi;
                        o[n][3] *= corr_hi;
                    }
                }
                // O += P V: P's C fragments of n-tiles 2kk, 2kk + 1 are the A fragment of
                // keys h0 + 16kk ..+16
#pragma unroll
                for (int kk = 0; kk < SK; ++kk) {
                    const u32 pa[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                                       pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                       pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                       pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                    const sptr vrow = vb + 2 * (h0 + 16 * kk) * LD;
#pragma unroll
                    for (int np = 0; np < NT / 2; ++np) {
                        u32 vf[4];  // b0, b1 of n-tile 2np, then of n-tile 2np + 1
                        ldsm_x4_trans(vf, vrow + 2 * 16 * np);
                        mma_16816(o[2 * np], pa, vf);
                        mma_16816(o[2 * np + 1], pa, vf + 2);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();  // nothing left in flight at exit (the queries, where no tile ran)

    store_rows<HD>(out, o, l_lo, l_hi, r_lo, r_hi, ok_lo, ok_hi, n_heads, head, t);
}

// two CTAs of PIPE_WARPS warps an SM: at most 128 registers a thread
#define ATTENTION_MMA_PIPELINED(HD)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * PIPE_WARPS, 2)                          \
        attention_mma_pipelined_hd##HD##_bf16(                                                \
            const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool,          \
            const u32* pos_pool, const u32* table, bf16* out, int nq, int q_stride,           \
            int q_col, int n_keys, int n_heads, int n_kv_heads, int tiles, float scale_log2) { \
        attention_mma_pipelined<HD>(q, q_pos, k_pool, v_pool, pos_pool, table, out, nq,       \
                                    q_stride, q_col, n_keys, n_heads, n_kv_heads, tiles,      \
                                    scale_log2);                                              \
    }
ATTENTION_MMA_PIPELINED(64)
ATTENTION_MMA_PIPELINED(128)
