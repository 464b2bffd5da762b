// Prefill attention on tensor cores: causal, over explicit positions, grouped-query heads, keys
// read from the paged KV cache through a slot table. bf16 in, f32 accumulate (mma.sync
// m16n8k16), flash-style: keys stream through shared memory one KV_BLOCK tile at a time with an
// online softmax per query row, so no (queries x keys) matrix exists anywhere.
//
// A CTA is one KV head and `tiles` 16-row tiles of query rows for each of the `group` query
// heads that read it (warps = group * tiles <= MMA_WARPS): every K/V tile is loaded once for
// all of them. Warp w owns query head kv_head * group + w / tiles and rows
// row0 + 16 * (w % tiles) ..+16. Per 32 keys a warp computes S = Q Kᵀ (4 n-tiles of 8 keys,
// head_dim / 16 k-steps), masks by position, updates each row's running max and sum, rounds P
// to bf16 and adds P V (head_dim / 8 n-tiles, 2 k-steps of 16 keys) to its f32 output.
//
// Fragments (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, f32):  c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// so a row's scores and outputs sit in the 4 lanes of its quad, reduced with two shuffles.

#define MMA_WARPS 8


// grid (ceil(nq / (16 * tiles)), n_kv_heads), block (32 * group * tiles)
// q: (nq, q_stride) bf16, head h at columns q_col + h * HD (post-RoPE); q_pos: (nq) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, n_kv_heads * HD) bf16; pos_pool: (n_slots, KV_BLOCK)
// table: (ceil(n_keys / KV_BLOCK)) u32, the slots in key order (ascending positions); all full
// but the last
// out: (nq, n_heads * HD) bf16
// scale_log2: log2(e) / sqrt(HD)
template <int HD>
__device__ __forceinline__ void attention_mma(const bf16* q, const u32* q_pos, const bf16* k_pool,
                                              const bf16* v_pool, const u32* pos_pool,
                                              const u32* table, bf16* out, int nq, int q_stride,
                                              int q_col, int n_keys, int n_heads, int n_kv_heads,
                                              int tiles, float scale_log2) {
    constexpr int KSTEPS = HD / 16, NT = HD / 8, WORDS = HD / 2;
    // row strides in 32-bit words: HD / 2 + 4, so that the 8 rows a fragment load touches
    // fall in distinct banks
    constexpr int ROW_WORDS = WORDS + 4;
    __shared__ u32 ks[KV_BLOCK][ROW_WORDS];
    __shared__ u32 vs[KV_BLOCK][ROW_WORDS];
    __shared__ u32 kpos[KV_BLOCK];
    __shared__ u32 cta_max_pos;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = n_heads / n_kv_heads, kv_head = blockIdx.y;
    const int head = kv_head * group + warp / tiles;
    const int rows_per_cta = 16 * tiles, row0 = blockIdx.x * rows_per_cta;
    const int wrow = row0 + 16 * (warp % tiles);  // the warp's first query row
    const int kv_dim = n_kv_heads * HD;
    const int r_lo = wrow + g, r_hi = wrow + g + 8;  // this lane's two rows
    const bool ok_lo = r_lo < nq, ok_hi = r_hi < nq;

    // the warp's queries as A fragments, one set per 16 channels (rows past nq are zero)
    u32 qa[KSTEPS][4];
    const u32* q_lo = (const u32*)(q + (size_t)(ok_lo ? r_lo : 0) * q_stride + q_col + head * HD);
    const u32* q_hi = (const u32*)(q + (size_t)(ok_hi ? r_hi : 0) * q_stride + q_col + head * HD);
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        qa[kk][0] = ok_lo ? q_lo[8 * kk + t] : 0u;
        qa[kk][1] = ok_hi ? q_hi[8 * kk + t] : 0u;
        qa[kk][2] = ok_lo ? q_lo[8 * kk + 4 + t] : 0u;
        qa[kk][3] = ok_hi ? q_hi[8 * kk + 4 + t] : 0u;
    }
    const u32 pos_lo = ok_lo ? q_pos[r_lo] : 0u, pos_hi = ok_hi ? q_pos[r_hi] : 0u;
    if (threadIdx.x == 0) {
        u32 mx = 0;
        for (int r = row0; r < row0 + rows_per_cta && r < nq; ++r) mx = max(mx, q_pos[r]);
        cta_max_pos = mx;
    }

    // running max (log2 units) and this lane's share of the row sums, rows g and g + 8
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    __syncthreads();

    const int n_tiles = (n_keys + KV_BLOCK - 1) / KV_BLOCK;
    for (int tile = 0; tile < n_tiles; ++tile) {
        const size_t slot = table[tile];
        if (pos_pool[slot * KV_BLOCK] > cta_max_pos) break;  // uniform across the CTA
        const int tile_keys = min(KV_BLOCK, n_keys - tile * KV_BLOCK);
        const u32* kw = (const u32*)(k_pool + slot * KV_BLOCK * kv_dim + kv_head * HD);
        const u32* vw = (const u32*)(v_pool + slot * KV_BLOCK * kv_dim + kv_head * HD);
        for (int i = threadIdx.x; i < KV_BLOCK * WORDS; i += blockDim.x) {
            const int key = i / WORDS, w = i % WORDS;
            const bool in = key < tile_keys;
            ks[key][w] = in ? kw[(size_t)key * (kv_dim / 2) + w] : 0u;
            vs[key][w] = in ? vw[(size_t)key * (kv_dim / 2) + w] : 0u;
        }
        for (int key = threadIdx.x; key < KV_BLOCK; key += blockDim.x)
            kpos[key] = key < tile_keys ? pos_pool[slot * KV_BLOCK + key] : 0xffffffffu;
        __syncthreads();

        for (int half = 0; half < KV_BLOCK; half += 32) {
            // S = Q Kᵀ for 32 keys: n-tile j holds keys half + 8j ..+8
            float s[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
                const u32* krow = ks[half + 8 * j + g];
#pragma unroll
                for (int kk = 0; kk < KSTEPS; ++kk) {
                    const u32 b[2] = {krow[8 * kk + t], krow[8 * kk + 4 + t]};
                    mma_16816(s[j], qa[kk], b);
                }
            }
            // mask by position, scale to log2 units, and the rows' maxima over these keys
            float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const u32 kp = kpos[half + 8 * j + 2 * t + c];
                    s[j][c] = ok_lo && kp <= pos_lo ? s[j][c] * scale_log2 : -INFINITY;
                    s[j][2 + c] = ok_hi && kp <= pos_hi ? s[j][2 + c] * scale_log2 : -INFINITY;
                    mx_lo = fmaxf(mx_lo, s[j][c]);
                    mx_hi = fmaxf(mx_hi, s[j][2 + c]);
                }
            }
            const float new_lo = fmaxf(m_lo, quad_max(mx_lo));
            const float new_hi = fmaxf(m_hi, quad_max(mx_hi));
            // a row that has seen no key yet keeps m = -inf, its p = 0 and its sums as they are
            const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
            const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
            const float corr_lo = exp2f(m_lo - base_lo), corr_hi = exp2f(m_hi - base_hi);
            m_lo = new_lo;
            m_hi = new_hi;
            float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[j][0] = exp2f(s[j][0] - base_lo);
                s[j][1] = exp2f(s[j][1] - base_lo);
                s[j][2] = exp2f(s[j][2] - base_hi);
                s[j][3] = exp2f(s[j][3] - base_hi);
                sum_lo += s[j][0] + s[j][1];
                sum_hi += s[j][2] + s[j][3];
            }
            l_lo = l_lo * corr_lo + sum_lo;
            l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][0] *= corr_lo;
                o[n][1] *= corr_lo;
                o[n][2] *= corr_hi;
                o[n][3] *= corr_hi;
            }
            // O += P V: P's C fragments of n-tiles 2kk, 2kk + 1 are the A fragment of keys
            // half + 16kk ..+16
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                const u32 pa[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                                   pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                   pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                const int k0 = half + 16 * kk + 2 * t;
                const bf16* v0 = (const bf16*)vs[k0];
                const bf16* v1 = (const bf16*)vs[k0 + 1];
                const bf16* v8 = (const bf16*)vs[k0 + 8];
                const bf16* v9 = (const bf16*)vs[k0 + 9];
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const int ch = 8 * n + g;
                    const u32 b[2] = {(u32)v0[ch] | ((u32)v1[ch] << 16),
                                      (u32)v8[ch] | ((u32)v9[ch] << 16)};
                    mma_16816(o[n], pa, b);
                }
            }
        }
        __syncthreads();
    }

    store_rows<HD>(out, o, l_lo, l_hi, r_lo, r_hi, ok_lo, ok_hi, n_heads, head, t);
}

#define ATTENTION_MMA(HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) attention_mma_hd##HD##_bf16( \
        const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool,              \
        const u32* pos_pool, const u32* table, bf16* out, int nq, int q_stride, int q_col,    \
        int n_keys, int n_heads, int n_kv_heads, int tiles, float scale_log2) {               \
        attention_mma<HD>(q, q_pos, k_pool, v_pool, pos_pool, table, out, nq, q_stride,       \
                          q_col, n_keys, n_heads, n_kv_heads, tiles, scale_log2);             \
    }
ATTENTION_MMA(64)
ATTENTION_MMA(128)
