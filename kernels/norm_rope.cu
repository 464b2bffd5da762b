// RMSNorm of rows and rotary position embedding from explicit positions.

// out = x / sqrt(mean(x^2) + eps) * w, one CTA per row (blockDim.x a multiple of 32, <= 1024).
// x: (rows, width) f32 or bf16; w: (width) bf16; out: (rows, width) bf16.
template <typename T>
__device__ void rmsnorm_row(const T* x, const bf16* w, bf16* out, int width, float eps,
                            float (*load)(const T*, int)) {
    __shared__ float partial[32];
    const int row = blockIdx.x;
    const T* xr = x + (size_t)row * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = load(xr, i);
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / (float)width + eps);
    bf16* o = out + (size_t)row * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        o[i] = f32_to_bf16(load(xr, i) * inv * bf16_to_f32(w[i]));
}

__device__ float load_f32(const float* p, int i) { return p[i]; }
__device__ float load_bf16(const bf16* p, int i) { return bf16_to_f32(p[i]); }

// grid (rows), block (256)
// x: (rows, width) f32; w: (width) bf16; out: (rows, width) bf16
extern "C" __global__ void rmsnorm_f32(const float* x, const bf16* w, bf16* out, int rows,
                                       int width, float eps) {
    if (blockIdx.x < rows) rmsnorm_row<float>(x, w, out, width, eps, load_f32);
}

// grid (rows), block (256)
// x: (rows, width) bf16; w: (width) bf16; out: (rows, width) bf16
extern "C" __global__ void rmsnorm_bf16(const bf16* x, const bf16* w, bf16* out, int rows,
                                        int width, float eps) {
    if (blockIdx.x < rows) rmsnorm_row<bf16>(x, w, out, width, eps, load_bf16);
}

// In place: within each head the pairs (x[2i], x[2i+1]) (GGUF's "normal" layout) or
// (x[i], x[i + head_dim/2]) (NEOX, `neox` = 1), i < head_dim/2, turn by positions[row] *
// inv_freq[i]. One thread per (row, head, pair).
// x: (rows, stride) bf16, the heads at columns col0 .. col0 + n_heads * head_dim
// positions: (rows) u32
// cos, sin: (max_positions, head_dim / 2) f32, indexed by position
extern "C" __global__ void rope_bf16(bf16* x, const u32* positions, const float* cos,
                                     const float* sin, int rows, int stride, int col0,
                                     int n_heads, int head_dim, int neox) {
    const int half = head_dim >> 1;
    const long long n = (long long)rows * n_heads * half;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(t % half);
        const int head = (int)((t / half) % n_heads);
        const int row = (int)(t / ((long long)half * n_heads));
        const u32 p = positions[row];
        const float c = cos[(size_t)p * half + i], s = sin[(size_t)p * half + i];
        // pair (2i, 2i + 1), or (i, i + half) in NEOX's layout
        bf16* h = x + (size_t)row * stride + col0 + head * head_dim + (neox ? i : 2 * i);
        const int second = neox ? half : 1;
        const float a = bf16_to_f32(h[0]), b = bf16_to_f32(h[second]);
        h[0] = f32_to_bf16(a * c - b * s);
        h[second] = f32_to_bf16(a * s + b * c);
    }
}

// In place, RMSNorm of each head (Qwen3's q/k norm): one thread per (row, head), two passes
// over its head_dim values.
// x: (rows, stride) bf16, the heads at columns col0 .. col0 + n_heads * head_dim; w: (head_dim)
extern "C" __global__ void head_rmsnorm_bf16(bf16* x, const bf16* w, int rows, int stride,
                                             int col0, int n_heads, int head_dim, float eps) {
    const long long n = (long long)rows * n_heads;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x) {
        bf16* h = x + (size_t)(t / n_heads) * stride + col0 + (t % n_heads) * head_dim;
        float ss = 0.f;
        for (int d = 0; d < head_dim; d++) {
            const float v = bf16_to_f32(h[d]);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / head_dim + eps);
        for (int d = 0; d < head_dim; d++) h[d] = f32_to_bf16(bf16_to_f32(h[d]) * inv * bf16_to_f32(w[d]));
    }
}
