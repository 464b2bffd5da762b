// SlimInfer block scores on the device (the same arithmetic as src/slim/score.rs):
// unit keys (the mean of each 8-row token unit's post-RoPE keys), the window queries' logits
// against them, and their reduction to one score per prompt block.

// Unit u covers the layer's prompt rows [u * unit_size, min((u + 1) * unit_size, prompt_rows)):
// kept prompt rows come in whole blocks (a multiple of unit_size), so units never straddle.
// One thread per (unit, column).
// k_pool: (n_slots, KV_BLOCK, row words) of kv_type (kv_types.cuh); table: the layer's slots in
// row order; k_scale: (kv_dim) f32, a Q8 layer's key channel divisors (multiplied back), or null
// unit_keys: (n_units, kv_dim) f32, n_units = ceil(prompt_rows / unit_size)
extern "C" __global__ void unit_keys_bf16(const unsigned short* k_pool, const u32* table,
                                          const float* k_scale, int kv_type, float* unit_keys,
                                          int prompt_rows, int unit_size, int kv_dim) {
    const int n_units = (prompt_rows + unit_size - 1) / unit_size;
    const int words = kv_words(kv_type, kv_dim);
    const long long total = (long long)n_units * kv_dim;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int u = (int)(t / kv_dim), c = (int)(t % kv_dim);
        const int r0 = u * unit_size, r1 = min(r0 + unit_size, prompt_rows);
        const float scale = k_scale ? k_scale[c] : 1.f;
        float sum = 0.f;
        for (int s = r0; s < r1; ++s) {
            const size_t row = (size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK;
            sum += kv_value(k_pool + row * words, c, kv_type) * scale;
        }
        unit_keys[t] = sum / (float)(r1 - r0);
    }
}

// The window's queries widened for the logits GEMM (src/cuda/ops.rs `unit_scores`, cuBLAS),
// grouped by KV head: qf[kv][r][j][d] = scale * q[r][q_col + (kv * group + j) * head_dim + d]
// for window row r < w, so that each KV head's rows form one (w * group, head_dim) matrix.
// q: (w, q_stride) bf16; qf: (n_kv_heads, w, group, head_dim) f32. Grid-stride.
extern "C" __global__ void query_rows_f32(const bf16* q, float* qf, int w, int q_stride,
                                          int q_col, int q_dim, int group, int head_dim,
                                          float scale) {
    const long long n = (long long)w * q_dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / q_dim, c = i % q_dim;
        const long long h = c / head_dim, d = c % head_dim;
        const long long kv = h / group, j = h % group;
        qf[((kv * w + r) * group + j) * head_dim + d] =
            bf16_to_f32(q[r * q_stride + q_col + c]) * scale;
    }
}

// Softmax of each row in place. One CTA (256 threads) per row.
// x: (rows, n) f32
extern "C" __global__ void softmax_rows_f32(float* x, int rows, int n) {
    __shared__ float red[32];
    float* r = x + (size_t)blockIdx.x * n;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, r[i]);
    mx = warp_max(mx);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : -INFINITY;
        v = warp_max(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    mx = red[0];
    __syncthreads();
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = __expf(r[i] - mx);
        r[i] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = 1.f / red[0];
    for (int i = threadIdx.x; i < n; i += blockDim.x) r[i] *= inv;
}

// One score per block from the per-row unit values, added to acc[block id] (the stage's
// running sum over layers). The units of a block are consecutive: block_first[b] ..
// block_first[b + 1] are the units of the b-th block present, block_ids[b] its id.
// One CTA (256 threads) per block present. Rows are (window query qi, head h).
// mode 0, attention mass: vals are softmax rows; score = mean over rows of the block's mass.
// mode 1, the paper's: vals are unscaled logits; score = max over the block's units of
//         mean over heads of |mean over window queries of the logit| (= |q_loc . k_unit|).
// mode 2, attention mass pooled by max: vals are softmax rows; score = max over window queries
//         of the block's mass averaged over heads.
// vals: (w * n_heads, n_units) f32, the row of (window query qi, head h) at
// ((h / group) * w + qi) * group + h % group (grouped by KV head, as the logits GEMM writes
// them); block_first: (n_present + 1) u32; block_ids: (n_present); acc: (n_prompt_blocks) f32
__device__ __forceinline__ size_t score_row(int qi, int h, int w, int group) {
    return ((size_t)(h / group) * w + qi) * group + h % group;
}

extern "C" __global__ void block_scores_f32(const float* vals, const u32* block_first,
                                            const u32* block_ids, float* acc, int w,
                                            int n_heads, int group, int n_units, int mode) {
    __shared__ float red[32];
    const int b = blockIdx.x;
    const int u0 = block_first[b], u1 = block_first[b + 1], rows = w * n_heads;
    float v = mode == 0 ? 0.f : -INFINITY;
    if (mode == 2) {
        // a warp per window query, its lanes across the block's units (each row's units are
        // contiguous: coalesced), summed over the heads; a thread per query walking its rows
        // unit by unit took ~1 ms a layer at 32k units (uncoalesced)
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int qi = warp; qi < w; qi += warps) {
            float s = 0.f;
            for (int h = 0; h < n_heads; ++h) {
                const float* row = vals + score_row(qi, h, w, group) * n_units;
                for (int u = u0 + lane; u < u1; u += 32) s += row[u];
            }
            v = fmaxf(v, warp_sum(s) / (float)n_heads);
        }
    } else if (mode == 0) {
        for (long long t = threadIdx.x; t < (long long)rows * (u1 - u0); t += blockDim.x) {
            const int r = (int)(t / (u1 - u0)), u = u0 + (int)(t % (u1 - u0));
            v += vals[(size_t)r * n_units + u];
        }
        v = warp_sum(v);
    } else {
        for (int u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
            float s = 0.f;
            for (int h = 0; h < n_heads; ++h) {
                float dot = 0.f;
                for (int qi = 0; qi < w; ++qi) dot += vals[score_row(qi, h, w, group) * n_units + u];
                s += fabsf(dot / (float)w);
            }
            v = fmaxf(v, s / (float)n_heads);
        }
        v = warp_max(v);
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = mode == 0 ? 0.f : -INFINITY;
        for (int i = 0; i < (blockDim.x >> 5); ++i)
            total = mode == 0 ? total + red[i] : fmaxf(total, red[i]);
        acc[block_ids[b]] += mode == 0 ? total / (float)rows : total;
    }
}
