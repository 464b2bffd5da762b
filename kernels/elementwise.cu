// Element-wise ops: the SwiGLU gate, the residual add, biases, and random fills for synthetic
// weights.

// out = silu(gate) * up, one thread per output element.
// gate_up: (rows, 2 * width) bf16, gate in columns [0, width), up in [width, 2 * width)
// out: (rows, width) bf16
extern "C" __global__ void silu_mul_bf16(const bf16* gate_up, bf16* out, int rows, int width) {
    const long long n = (long long)rows * width;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x) {
        const long long row = t / width, col = t % width;
        const float g = bf16_to_f32(gate_up[row * 2 * width + col]);
        const float u = bf16_to_f32(gate_up[row * 2 * width + width + col]);
        out[t] = f32_to_bf16(g / (1.f + __expf(-g)) * u);
    }
}

// h += a (the residual stream stays in f32).
// h: (n) f32; a: (n) bf16
extern "C" __global__ void residual_add_f32(float* h, const bf16* a, long long n) {
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x)
        h[t] += bf16_to_f32(a[t]);
}

// Uniform values in [-scale, scale) from a counter hash of (seed, index): synthetic weights.
// out: (n) bf16
extern "C" __global__ void fill_uniform_bf16(bf16* out, long long n, unsigned long long seed,
                                             float scale) {
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(t + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.f / 16777216.f);  // [0, 1)
        out[t] = f32_to_bf16((2.f * u - 1.f) * scale);
    }
}

// x += bias, each row (Qwen2's q/k/v biases).
// x: (rows, width) bf16; bias: (width) bf16
extern "C" __global__ void bias_add_bf16(bf16* x, const bf16* bias, int rows, int width) {
    const long long n = (long long)rows * width;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x)
        x[t] = f32_to_bf16(bf16_to_f32(x[t]) + bf16_to_f32(bias[t % width]));
}
