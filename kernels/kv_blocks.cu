// The paged KV cache on the device: appending a step's rows, and copying whole blocks.
// A slot holds KV_BLOCK rows of one layer: k and v (KV_BLOCK, row words) of the pool's element
// type (kv_types.cuh: bf16 or f16, a word a value, or Q8 groups) and the rows' positions
// (KV_BLOCK) u32.

// Append `rows` rows as sequence rows row0 .. row0 + rows of one layer, a 16-bit value a word
// (TO_F16: narrowed to f16, else the bf16 bits as they are). One thread a value.
// qkv: (rows, qkv_stride) bf16, keys at columns k_col .., values at v_col .. (kv_dim each)
// positions: (rows) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, kv_dim) words; pos_pool: (n_slots, KV_BLOCK) u32
// table: (>= (row0 + rows + KV_BLOCK - 1) / KV_BLOCK) u32, the layer's slot per block of rows
template <bool TO_F16>
__device__ __forceinline__ void kv_append_words(const bf16* qkv, const u32* positions,
                                                unsigned short* k_pool, unsigned short* v_pool,
                                                u32* pos_pool, const u32* table, int row0,
                                                int rows, int qkv_stride, int k_col, int v_col,
                                                int kv_dim) {
    const long long total = (long long)rows * kv_dim;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(t / kv_dim), c = (int)(t % kv_dim);
        const int s = row0 + r;
        const size_t dst = ((size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK);
        const bf16 k = qkv[(size_t)r * qkv_stride + k_col + c];
        const bf16 v = qkv[(size_t)r * qkv_stride + v_col + c];
        k_pool[dst * kv_dim + c] = TO_F16 ? f32_to_f16(bf16_to_f32(k)) : k;
        v_pool[dst * kv_dim + c] = TO_F16 ? f32_to_f16(bf16_to_f32(v)) : v;
        if (c == 0) pos_pool[dst] = positions[r];
    }
}

// The appends of the three types take the same arguments (k_scale: the layer's key channel
// divisors, kv_dim f32, read by the Q8 one only).
#define KV_APPEND_ARGS                                                                           \
    const bf16 *qkv, const u32 *positions, unsigned short *k_pool, unsigned short *v_pool,       \
        u32 *pos_pool, const u32 *table, const float *k_scale, int row0, int rows,               \
        int qkv_stride, int k_col, int v_col, int kv_dim

extern "C" __global__ void kv_append_bf16(KV_APPEND_ARGS) {
    (void)k_scale;
    kv_append_words<false>(qkv, positions, k_pool, v_pool, pos_pool, table, row0, rows,
                           qkv_stride, k_col, v_col, kv_dim);
}

extern "C" __global__ void kv_append_f16(KV_APPEND_ARGS) {
    (void)k_scale;
    kv_append_words<true>(qkv, positions, k_pool, v_pool, pos_pool, table, row0, rows,
                          qkv_stride, k_col, v_col, kv_dim);
}

// The append into a Q8 pool: one thread a (row, group), keys divided by k_scale first. Pools:
// (n_slots, KV_BLOCK, kv_dim / 32 * 17) words.
extern "C" __global__ void kv_append_q8(KV_APPEND_ARGS) {
    const int groups = kv_dim / Q8_GROUP, words = groups * Q8_WORDS;
    const long long total = (long long)rows * groups;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(t / groups), g = (int)(t % groups);
        const int s = row0 + r;
        const size_t dst = ((size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK);
        const bf16* src = qkv + (size_t)r * qkv_stride + g * Q8_GROUP;
        float x[Q8_GROUP];
        for (int i = 0; i < Q8_GROUP; ++i) x[i] = bf16_to_f32(src[k_col + i]);
        unsigned short* out = k_pool + dst * words + g * Q8_WORDS;
        q8_encode_group(x, k_scale ? k_scale + g * Q8_GROUP : nullptr, out);
        for (int i = 0; i < Q8_GROUP; ++i) x[i] = bf16_to_f32(src[v_col + i]);
        q8_encode_group(x, nullptr, v_pool + dst * words + g * Q8_WORDS);
        if (g == 0) pos_pool[dst] = positions[r];
    }
}

// Each key channel's largest |k| over `rows` rows of qkv (keys at k_col): the first append of
// a Q8 layer sets its channel scale from these (src/backend/kv_format.rs, key_scale_from_amax).
// One thread a channel. amax: (kv_dim) f32
extern "C" __global__ void key_channel_amax(const bf16* qkv, float* amax, int rows,
                                            int qkv_stride, int k_col, int kv_dim) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < kv_dim; c += gridDim.x * blockDim.x) {
        float m = 0.f;
        for (int r = 0; r < rows; ++r)
            m = fmaxf(m, fabsf(bf16_to_f32(qkv[(size_t)r * qkv_stride + k_col + c])));
        amax[c] = m;
    }
}

// The first n_keys rows of a pool of kv_type (through its table) widened to a bf16 pool whose
// slot i holds block i (prefill attention reads bf16 tiles): Q8 keys multiplied back by k_scale;
// and, as the CPU engine attends a prefill's own rows unrounded, each of the last `fresh`
// rows whose position is its query's (q_pos, fresh rows) taken from qkv instead (keys at column
// k_col, values at v_col of row r of qkv, qkv_stride apart). One thread a (row, channel).
// out_k, out_v: (ceil(n_keys / KV_BLOCK), KV_BLOCK, kv_dim) bf16; out_pos: (.., KV_BLOCK) u32
extern "C" __global__ void kv_widen_bf16(const unsigned short* k_pool,
                                         const unsigned short* v_pool, const u32* pos_pool,
                                         const u32* table, const float* k_scale, int kv_type,
                                         int n_keys, int kv_dim, const bf16* qkv,
                                         const u32* q_pos, int fresh, int qkv_stride, int k_col,
                                         int v_col, bf16* out_k, bf16* out_v, u32* out_pos) {
    const int words = kv_words(kv_type, kv_dim);
    const long long total = (long long)n_keys * kv_dim;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int s = (int)(t / kv_dim), c = (int)(t % kv_dim);
        const size_t row = (size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK;
        const u32 p = pos_pool[row];
        const int r = s - (n_keys - fresh);
        if (r >= 0 && q_pos[r] == p) {
            const bf16* src = qkv + (size_t)r * qkv_stride;
            out_k[t] = src[k_col + c];
            out_v[t] = src[v_col + c];
        } else {
            const float scale = k_scale ? k_scale[c] : 1.f;
            out_k[t] = f32_to_bf16(kv_value(k_pool + row * words, c, kv_type) * scale);
            out_v[t] = f32_to_bf16(kv_value(v_pool + row * words, c, kv_type));
        }
        if (c == 0) out_pos[s] = p;
    }
}

// Copy whole slots: slot dst_slots[i] of dst = slot src_slots[i] of src.
// src, dst: (n_slots, slot_elems) 16-bit words (k or v pools of any type, possibly the same
// buffer)
// src_slots, dst_slots: (n) u32
extern "C" __global__ void kv_copy_blocks_bf16(const bf16* src, bf16* dst, const u32* src_slots,
                                               const u32* dst_slots, int n, int slot_elems) {
    const long long total = (long long)n * slot_elems;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(t / slot_elems), e = (int)(t % slot_elems);
        dst[(size_t)dst_slots[i] * slot_elems + e] = src[(size_t)src_slots[i] * slot_elems + e];
    }
}

// Fetch whole blocks from a host tier that the kernel reads over PCIe (pinned memory mapped
// into the device's address space): block pairs[2 i] of the host stores into slot
// pairs[2 i + 1] of the pool, 16 bytes a thread, all of a layer's blocks in one launch (a copy
// a block and a store costs the host a driver call each: 3 x ~350 blocks a decode step of the
// 8B shape with random weights).
// host_k, host_v: (blocks, KV_BLOCK * kv_dim) bf16 as 16-byte pieces (slot_pieces a block);
// host_pos: (blocks, KV_BLOCK) u32 as 16-byte pieces (KV_BLOCK / 4 a block); the pools alike
// pairs: (n, 2) u32
extern "C" __global__ void kv_fetch_blocks(const uint4* host_k, const uint4* host_v,
                                           const uint4* host_pos, uint4* k_pool, uint4* v_pool,
                                           uint4* pos_pool, const u32* pairs, int n,
                                           int slot_pieces) {
    const long long pos_pieces = KV_BLOCK / 4;
    const long long per = 2LL * slot_pieces + pos_pieces;
    const long long total = (long long)n * per;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long i = t / per, e = t % per;
        const size_t b = pairs[2 * i], d = pairs[2 * i + 1];
        if (e < slot_pieces) {
            k_pool[d * slot_pieces + e] = host_k[b * slot_pieces + e];
        } else if (e < 2LL * slot_pieces) {
            const long long f = e - slot_pieces;
            v_pool[d * slot_pieces + f] = host_v[b * slot_pieces + f];
        } else {
            const long long f = e - 2LL * slot_pieces;
            pos_pool[d * pos_pieces + f] = host_pos[b * pos_pieces + f];
        }
    }
}
