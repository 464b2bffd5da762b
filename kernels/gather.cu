// Row gathers: SlimInfer's pruning between layers and the embedding lookup.

// dst[i] = src[idx[i]], one CTA-stride loop over elements.
// src: (n_src, width) f32; idx: (n) u32 ascending, each < n_src; dst: (n, width) f32
extern "C" __global__ void gather_rows_f32(const float* src, const u32* idx, float* dst, int n,
                                           int width) {
    const long long total = (long long)n * width;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long i = t / width, c = t % width;
        dst[t] = src[(size_t)idx[i] * width + c];
    }
}

// Positions travel with the rows: dst_pos[i] = src_pos[idx[i]].
// src_pos: (n_src) u32; idx: (n) u32; dst_pos: (n) u32
extern "C" __global__ void gather_positions_u32(const u32* src_pos, const u32* idx, u32* dst_pos,
                                                int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst_pos[i] = src_pos[idx[i]];
}

// Embedding lookup, widened to the f32 residual stream.
// table: (vocab, width) bf16; tokens: (n) u32; dst: (n, width) f32
extern "C" __global__ void embed_rows_bf16(const bf16* table, const u32* tokens, float* dst,
                                           int n, int width) {
    const long long total = (long long)n * width;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long i = t / width, c = t % width;
        dst[t] = bf16_to_f32(table[(size_t)tokens[i] * width + c]);
    }
}
