// The paged KV cache on the device: appending a step's rows, and copying whole blocks.
// A slot holds KV_BLOCK rows of one layer: k and v (KV_BLOCK, kv_dim) bf16 and the rows'
// positions (KV_BLOCK) u32.

// Append `rows` rows as sequence rows row0 .. row0 + rows of one layer.
// qkv: (rows, qkv_stride) bf16, keys at columns k_col .., values at v_col .. (kv_dim each)
// positions: (rows) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, kv_dim) bf16; pos_pool: (n_slots, KV_BLOCK) u32
// table: (>= (row0 + rows + KV_BLOCK - 1) / KV_BLOCK) u32, the layer's slot per block of rows
extern "C" __global__ void kv_append_bf16(const bf16* qkv, const u32* positions, bf16* k_pool,
                                          bf16* v_pool, u32* pos_pool, const u32* table,
                                          int row0, int rows, int qkv_stride, int k_col,
                                          int v_col, int kv_dim) {
    const long long total = (long long)rows * kv_dim;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(t / kv_dim), c = (int)(t % kv_dim);
        const int s = row0 + r;
        const size_t dst = ((size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK);
        k_pool[dst * kv_dim + c] = qkv[(size_t)r * qkv_stride + k_col + c];
        v_pool[dst * kv_dim + c] = qkv[(size_t)r * qkv_stride + v_col + c];
        if (c == 0) pos_pool[dst] = positions[r];
    }
}

// Copy whole slots: slot dst_slots[i] of dst = slot src_slots[i] of src.
// src, dst: (n_slots, slot_elems) bf16 (k or v pools, possibly the same buffer)
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
