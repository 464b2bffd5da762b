// Causal attention over explicit positions, grouped-query heads, keys read from the paged KV
// cache through a slot table (SlimInfer's kept rows in prefill, the active blocks in decode).
// Flash-style: keys stream through shared memory in tiles of KV_BLOCK with an online softmax
// per query row, so no (queries x keys) matrix exists anywhere. A query at position p sees
// the keys at positions <= p; keys are in ascending position order, so a CTA stops at the
// first tile that starts past its last query.
//
// CTA = 4 warps x ATT_ROWS query rows of one query head; lane j of a warp owns key j of each
// half-tile for the scores and head_dim / 32 output dimensions for the weighted sum.

#define ATT_WARPS 4
#define ATT_ROWS 4
#define ATT_MAX_HD 128

// grid (ceil(nq / (ATT_WARPS * ATT_ROWS)), n_heads), block (32 * ATT_WARPS)
// q: (nq, q_stride) bf16, head h at columns q_col + h * head_dim (post-RoPE)
// q_pos: (nq) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, n_kv_heads * head_dim) bf16; pos_pool: (n_slots, KV_BLOCK)
// table: (ceil(n_keys / KV_BLOCK)) u32, the slots in key order; all full but the last
// out: (nq, n_heads * head_dim) bf16
// head_dim: a multiple of 32, at most ATT_MAX_HD; scale: 1 / sqrt(head_dim)
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
attention_bf16(const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool,
               const u32* pos_pool, const u32* table, bf16* out, int nq, int q_stride,
               int q_col, int n_keys, int n_heads, int n_kv_heads, int head_dim, float scale) {
    __shared__ float qs[ATT_WARPS * ATT_ROWS][ATT_MAX_HD];
    __shared__ u32 ks[KV_BLOCK][ATT_MAX_HD / 2 + 1];  // +1 word: lanes hit distinct banks
    __shared__ bf16 vs[KV_BLOCK][ATT_MAX_HD];
    __shared__ u32 kpos[KV_BLOCK];
    __shared__ u32 tile_max_pos;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int head = blockIdx.y, kv_head = head / (n_heads / n_kv_heads);
    const int kv_dim = n_kv_heads * head_dim, words = head_dim / 2, dpl = head_dim / 32;
    const int row0 = blockIdx.x * (ATT_WARPS * ATT_ROWS);

    // queries of the CTA, scaled, as f32
    for (int i = threadIdx.x; i < ATT_WARPS * ATT_ROWS * head_dim; i += blockDim.x) {
        const int r = i / head_dim, d = i % head_dim, row = row0 + r;
        qs[r][d] = row < nq
            ? bf16_to_f32(q[(size_t)row * q_stride + q_col + head * head_dim + d]) * scale
            : 0.f;
    }
    if (threadIdx.x == 0) {
        u32 mx = 0;
        for (int r = 0; r < ATT_WARPS * ATT_ROWS && row0 + r < nq; ++r)
            mx = max(mx, q_pos[row0 + r]);
        tile_max_pos = mx;
    }
    u32 my_pos[ATT_ROWS];
    bool valid[ATT_ROWS];
    for (int r = 0; r < ATT_ROWS; ++r) {
        const int row = row0 + warp * ATT_ROWS + r;
        valid[r] = row < nq;
        my_pos[r] = valid[r] ? q_pos[row] : 0u;
    }
    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_MAX_HD / 32];
    for (int r = 0; r < ATT_ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        for (int d = 0; d < ATT_MAX_HD / 32; ++d) acc[r][d] = 0.f;
    }
    __syncthreads();

    const int n_tiles = (n_keys + KV_BLOCK - 1) / KV_BLOCK;
    for (int t = 0; t < n_tiles; ++t) {
        const size_t slot = table[t];
        if (pos_pool[slot * KV_BLOCK] > tile_max_pos) break;  // uniform across the CTA
        const int tile_keys = min(KV_BLOCK, n_keys - t * KV_BLOCK);
        const u32* kw = (const u32*)(k_pool + slot * KV_BLOCK * kv_dim + kv_head * head_dim);
        const u32* vw = (const u32*)(v_pool + slot * KV_BLOCK * kv_dim + kv_head * head_dim);
        for (int i = threadIdx.x; i < KV_BLOCK * words; i += blockDim.x) {
            const int key = i / words, w = i % words;
            const bool in = key < tile_keys;
            ks[key][w] = in ? kw[(size_t)key * (kv_dim / 2) + w] : 0u;
            ((u32*)vs[key])[w] = in ? vw[(size_t)key * (kv_dim / 2) + w] : 0u;
        }
        for (int key = threadIdx.x; key < KV_BLOCK; key += blockDim.x)
            kpos[key] = key < tile_keys ? pos_pool[slot * KV_BLOCK + key] : 0xffffffffu;
        __syncthreads();

        for (int half = 0; half < KV_BLOCK; half += 32) {
            const int key = half + lane;
            float s[ATT_ROWS];
            for (int r = 0; r < ATT_ROWS; ++r) s[r] = 0.f;
            for (int w = 0; w < words; ++w) {
                const u32 kk = ks[key][w];
                const float k0 = __uint_as_float(kk << 16), k1 = __uint_as_float(kk & 0xffff0000u);
                for (int r = 0; r < ATT_ROWS; ++r) {
                    const float2 qq = *(const float2*)&qs[warp * ATT_ROWS + r][2 * w];
                    s[r] = fmaf(qq.x, k0, fmaf(qq.y, k1, s[r]));
                }
            }
            float p[ATT_ROWS];
            for (int r = 0; r < ATT_ROWS; ++r) {
                const bool seen = valid[r] && kpos[key] <= my_pos[r];
                const float sr = seen ? s[r] : -INFINITY;
                const float m_new = fmaxf(m[r], warp_max(sr));
                if (m_new == -INFINITY) {  // nothing visible to this row yet
                    p[r] = 0.f;
                    continue;
                }
                const float corr = __expf(m[r] - m_new);  // 0 when m[r] was -inf
                p[r] = seen ? __expf(sr - m_new) : 0.f;
                l[r] = l[r] * corr + warp_sum(p[r]);
                m[r] = m_new;
                for (int d = 0; d < ATT_MAX_HD / 32; ++d) acc[r][d] *= corr;
            }
            for (int j = 0; j < 32; ++j) {
                float v[ATT_MAX_HD / 32];
                for (int d = 0; d < ATT_MAX_HD / 32; ++d)
                    v[d] = d < dpl ? bf16_to_f32(vs[half + j][lane * dpl + d]) : 0.f;
                for (int r = 0; r < ATT_ROWS; ++r) {
                    const float pj = __shfl_sync(0xffffffffu, p[r], j);
                    for (int d = 0; d < ATT_MAX_HD / 32; ++d) acc[r][d] = fmaf(pj, v[d], acc[r][d]);
                }
            }
        }
        __syncthreads();
    }

    for (int r = 0; r < ATT_ROWS; ++r) {
        if (!valid[r]) continue;
        const int row = row0 + warp * ATT_ROWS + r;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        bf16* o = out + (size_t)row * n_heads * head_dim + head * head_dim + lane * dpl;
        for (int d = 0; d < ATT_MAX_HD / 32; ++d)
            if (d < dpl) o[d] = f32_to_bf16(acc[r][d] * inv);
    }
}
