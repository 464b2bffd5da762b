// Decode attention (one query row) split over the key range, so that every multiprocessor
// works on a long context: CTA (split, KV head) reduces its keys to a partial softmax for each
// query head of the group (the running max m, the sum l of exp(score - m), and the weighted
// values o), reading each key and value row once, and one CTA per head combines the splits. Keys come from the paged KV cache through the slot table, as in attention.cu; a
// key at a position past the query's is masked.
//
// The reductions are tree reductions over the CTA in shared memory (blockDim.x a power of two),
// so the kernels also run, and are checked, as one thread on the host
// (tests/cuda_kernels_on_host.rs).

#define DEC_TILE 128
#define DEC_MAX_HD 128
#define DEC_MAX_GROUP 8
// values of the output each thread keeps: head_dim <= blockDim.x * DEC_DIMS (the host check,
// one thread, sets it to DEC_MAX_HD)
#ifndef DEC_DIMS
#define DEC_DIMS 1
#endif

// grid (n_splits, n_kv_heads), block (DEC_TILE): the query heads of one KV head together, so
// that each key and value row is read once for its whole group.
// q: (1, q_stride) bf16, head h at columns q_col + h * head_dim (post-RoPE); q_pos: (1) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, n_kv_heads * head_dim) bf16; pos_pool: (n_slots, KV_BLOCK)
// table: (ceil(n_keys / KV_BLOCK)) u32
// part_m, part_l: (n_heads, n_splits) f32; part_o: (n_heads, n_splits, head_dim) f32
// n_heads / n_kv_heads <= DEC_MAX_GROUP
extern "C" __global__ void decode_attention_split_bf16(
    const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool, const u32* pos_pool,
    const u32* table, float* part_m, float* part_l, float* part_o, int q_stride, int q_col,
    int n_keys, int n_heads, int n_kv_heads, int head_dim, int keys_per_split, float scale) {
    __shared__ float qs[DEC_MAX_GROUP][DEC_MAX_HD];
    __shared__ float p[DEC_MAX_GROUP][DEC_TILE];
    __shared__ float red[DEC_TILE];
    const int split = blockIdx.x, kv_head = blockIdx.y, n_splits = gridDim.x;
    const int group = n_heads / n_kv_heads, head0 = kv_head * group;
    const int kv_dim = n_kv_heads * head_dim;
    const u32 qp = q_pos[0];
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x)
        qs[i / head_dim][i % head_dim] =
            bf16_to_f32(q[q_col + head0 * head_dim + i]) * scale;
    __syncthreads();
    const int k0 = split * keys_per_split;
    const int k1 = min(n_keys, k0 + keys_per_split);
    float m[DEC_MAX_GROUP], l[DEC_MAX_GROUP];
    float o[DEC_MAX_GROUP][DEC_DIMS];  // this thread's dims d = threadIdx.x + i * blockDim.x
    for (int g = 0; g < DEC_MAX_GROUP; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int i = 0; i < DEC_DIMS; ++i) o[g][i] = 0.f;
    }
    for (int t0 = k0; t0 < k1; t0 += DEC_TILE) {
        const int n = min(DEC_TILE, k1 - t0);
        // scores of the tile for every head of the group, one key per thread, the key read once
        for (int j = threadIdx.x; j < DEC_TILE; j += blockDim.x) {
            float s[DEC_MAX_GROUP];
            for (int g = 0; g < group; ++g) s[g] = -INFINITY;
            if (j < n) {
                const int key = t0 + j;
                const size_t row = (size_t)table[key / KV_BLOCK] * KV_BLOCK + key % KV_BLOCK;
                if (pos_pool[row] <= qp) {
                    const bf16* k = k_pool + row * kv_dim + kv_head * head_dim;
                    for (int g = 0; g < group; ++g) s[g] = 0.f;
                    for (int d = 0; d < head_dim; ++d) {
                        const float kd = bf16_to_f32(k[d]);
                        for (int g = 0; g < group; ++g) s[g] += qs[g][d] * kd;
                    }
                }
            }
            for (int g = 0; g < group; ++g) p[g][j] = s[g];
        }
        __syncthreads();
        float alpha[DEC_MAX_GROUP];
        bool live = false;
        for (int g = 0; g < group; ++g) {
            // the tile's max for head g
            for (int j = threadIdx.x; j < DEC_TILE; j += blockDim.x) red[j] = p[g][j];
            __syncthreads();
            for (int w = DEC_TILE / 2; w > 0; w >>= 1) {
                for (int j = threadIdx.x; j < w; j += blockDim.x) red[j] = fmaxf(red[j], red[j + w]);
                __syncthreads();
            }
            const float m_new = fmaxf(m[g], red[0]);
            __syncthreads();
            // every key so far masked: nothing to add (and no inf - inf)
            alpha[g] = m_new == -INFINITY ? 1.f : __expf(m[g] - m_new);
            for (int j = threadIdx.x; j < DEC_TILE; j += blockDim.x) {
                p[g][j] = p[g][j] == -INFINITY ? 0.f : __expf(p[g][j] - m_new);
                red[j] = p[g][j];
            }
            __syncthreads();
            for (int w = DEC_TILE / 2; w > 0; w >>= 1) {
                for (int j = threadIdx.x; j < w; j += blockDim.x) red[j] += red[j + w];
                __syncthreads();
            }
            l[g] = l[g] * alpha[g] + red[0];
            m[g] = m_new;
            live = live || m_new != -INFINITY;
            __syncthreads();
        }
        if (!live) continue;
        // the weighted values, each value row read once for the group
        for (int i = 0, d = threadIdx.x; d < head_dim; ++i, d += blockDim.x) {
            float acc[DEC_MAX_GROUP];
            for (int g = 0; g < group; ++g) acc[g] = o[g][i] * alpha[g];
            for (int j = 0; j < n; ++j) {
                const int key = t0 + j;
                const size_t row = (size_t)table[key / KV_BLOCK] * KV_BLOCK + key % KV_BLOCK;
                const float vd = bf16_to_f32(v_pool[row * kv_dim + kv_head * head_dim + d]);
                for (int g = 0; g < group; ++g) acc[g] += p[g][j] * vd;
            }
            for (int g = 0; g < group; ++g) o[g][i] = acc[g];
        }
        __syncthreads();
    }
    for (int g = 0; g < group; ++g) {
        const size_t part = (size_t)(head0 + g) * n_splits + split;
        if (threadIdx.x == 0) {
            part_m[part] = m[g];
            part_l[part] = l[g];
        }
        for (int i = 0, d = threadIdx.x; d < head_dim; ++i, d += blockDim.x)
            part_o[part * head_dim + d] = o[g][i];
    }
}

// grid (n_heads), block (DEC_TILE): out[head] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M)
// out: (1, n_heads * head_dim) bf16
extern "C" __global__ void decode_attention_combine_bf16(const float* part_m, const float* part_l,
                                                         const float* part_o, bf16* out,
                                                         int n_splits, int head_dim) {
    const int head = blockIdx.x;
    const float* m = part_m + (size_t)head * n_splits;
    const float* l = part_l + (size_t)head * n_splits;
    float big = -INFINITY;
    for (int s = 0; s < n_splits; ++s) big = fmaxf(big, m[s]);
    float total = 0.f;
    for (int s = 0; s < n_splits; ++s)
        if (m[s] != -INFINITY) total += l[s] * __expf(m[s] - big);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; ++s)
            if (m[s] != -INFINITY)
                acc += part_o[((size_t)head * n_splits + s) * head_dim + d] * __expf(m[s] - big);
        out[head * head_dim + d] = f32_to_bf16(total > 0.f ? acc / total : 0.f);
    }
}
