// GGUF weights to bf16, at load, on the device: the file's blocks are uploaded as bytes and
// each thread expands one block (32 values, or 256 for the K-quants) into out[offset ..].
// The layouts are GGML's (little-endian, packed, so every field is read byte by byte);
// `crate::backend::cpu_ops` dequantizes through candle as the reference.
//
// Every entry point: (const unsigned char* raw, long long n_blocks, bf16* out, long long offset)

typedef unsigned char u8;

__device__ __forceinline__ unsigned int rd16(const u8* p) { return p[0] | ((unsigned int)p[1] << 8); }

__device__ __forceinline__ unsigned int rd32(const u8* p) {
    return p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) | ((unsigned int)p[3] << 24);
}

// IEEE half (raw bits) to f32, subnormals included.
__device__ __forceinline__ float f16_to_f32(unsigned int h) {
    const unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * (1.f / 16777216.f);  // m * 2^-24
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

#define BLOCKS(n_blocks)                                                          \
    for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < (n_blocks); \
         b += (long long)gridDim.x * blockDim.x)

// Q4_0: d (f16), 16 bytes of nibbles; value j = (nibble - 8) * d, low nibbles first.
extern "C" __global__ void dequant_q4_0_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 18;
        const float d = f16_to_f32(rd16(p));
        bf16* y = out + offset + b * 32;
        for (int j = 0; j < 16; j++) {
            y[j] = f32_to_bf16(((int)(p[2 + j] & 15) - 8) * d);
            y[j + 16] = f32_to_bf16(((int)(p[2 + j] >> 4) - 8) * d);
        }
    }
}

// Q4_1: d, m (f16), 16 bytes of nibbles; value = nibble * d + m.
extern "C" __global__ void dequant_q4_1_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 20;
        const float d = f16_to_f32(rd16(p)), m = f16_to_f32(rd16(p + 2));
        bf16* y = out + offset + b * 32;
        for (int j = 0; j < 16; j++) {
            y[j] = f32_to_bf16((p[4 + j] & 15) * d + m);
            y[j + 16] = f32_to_bf16((p[4 + j] >> 4) * d + m);
        }
    }
}

// Q5_0: d (f16), 32 high bits (u32), 16 bytes of nibbles; value = (5-bit - 16) * d.
extern "C" __global__ void dequant_q5_0_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 22;
        const float d = f16_to_f32(rd16(p));
        const unsigned int qh = rd32(p + 2);
        bf16* y = out + offset + b * 32;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
            y[j] = f32_to_bf16((((p[6 + j] & 15) | h0) - 16) * d);
            y[j + 16] = f32_to_bf16((((p[6 + j] >> 4) | h1) - 16) * d);
        }
    }
}

// Q5_1: d, m (f16), 32 high bits, 16 bytes of nibbles; value = 5-bit * d + m.
extern "C" __global__ void dequant_q5_1_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 24;
        const float d = f16_to_f32(rd16(p)), m = f16_to_f32(rd16(p + 2));
        const unsigned int qh = rd32(p + 4);
        bf16* y = out + offset + b * 32;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
            y[j] = f32_to_bf16(((p[8 + j] & 15) | h0) * d + m);
            y[j + 16] = f32_to_bf16(((p[8 + j] >> 4) | h1) * d + m);
        }
    }
}

// Q8_0: d (f16), 32 signed bytes; value = q * d.
extern "C" __global__ void dequant_q8_0_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 34;
        const float d = f16_to_f32(rd16(p));
        bf16* y = out + offset + b * 32;
        for (int j = 0; j < 32; j++) y[j] = f32_to_bf16((float)(signed char)p[2 + j] * d);
    }
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block's 12 scale bytes.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K (256 values): d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
extern "C" __global__ void dequant_q4_k_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 144;
        const float d = f16_to_f32(rd16(p)), dmin = f16_to_f32(rd16(p + 2));
        const u8* scales = p + 4;
        const u8* q = p + 16;
        bf16* y = out + offset + b * 256;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
            int sc, mn;
            scale_min_k4(is, scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            scale_min_k4(is + 1, scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++) {
                y[j + l] = f32_to_bf16(d1 * (q[l] & 15) - m1);
                y[j + 32 + l] = f32_to_bf16(d2 * (q[l] >> 4) - m2);
            }
        }
    }
}

// Q5_K (256 values): d, dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of nibbles.
extern "C" __global__ void dequant_q5_k_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 176;
        const float d = f16_to_f32(rd16(p)), dmin = f16_to_f32(rd16(p + 2));
        const u8* scales = p + 4;
        const u8* qh = p + 16;
        const u8* ql = p + 48;
        bf16* y = out + offset + b * 256;
        unsigned int u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            int sc, mn;
            scale_min_k4(is, scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            scale_min_k4(is + 1, scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++) {
                y[j + l] = f32_to_bf16(d1 * ((ql[l] & 15) + ((qh[l] & u1) ? 16 : 0)) - m1);
                y[j + 32 + l] = f32_to_bf16(d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2);
            }
        }
    }
}

// Q6_K (256 values): 128 bytes of low nibbles, 64 of 2-bit highs, 16 signed scales, d (f16).
extern "C" __global__ void dequant_q6_k_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 210;
        const u8* ql = p;
        const u8* qh = p + 128;
        const signed char* sc = (const signed char*)(p + 192);
        const float d = f16_to_f32(rd16(p + 208));
        bf16* y = out + offset + b * 256;
        for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[n + l] = f32_to_bf16(d * sc[is] * q1);
                y[n + l + 32] = f32_to_bf16(d * sc[is + 2] * q2);
                y[n + l + 64] = f32_to_bf16(d * sc[is + 4] * q3);
                y[n + l + 96] = f32_to_bf16(d * sc[is + 6] * q4);
            }
        }
    }
}

// Q2_K (256 values): 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit values, d, dmin.
extern "C" __global__ void dequant_q2_k_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 84;
        const u8* scales = p;
        const u8* q = p + 16;
        const float d = f16_to_f32(rd16(p + 80)), dmin = f16_to_f32(rd16(p + 82));
        bf16* y = out + offset + b * 256;
        int is = 0, k = 0;
        for (int n = 0; n < 256; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; half++) {
                    const int s = scales[is++];
                    const float dl = d * (s & 15), ml = dmin * (s >> 4);
                    for (int l = 0; l < 16; l++)
                        y[k++] = f32_to_bf16(dl * ((q[l + 16 * half] >> shift) & 3) - ml);
                }
            }
        }
    }
}

// Q3_K (256 values): 32 bytes of high-bit masks, 64 of 2-bit values, 12 bytes of 6-bit
// scales (offset by 32), d (f16).
extern "C" __global__ void dequant_q3_k_bf16(const u8* raw, long long n_blocks, bf16* out,
                                             long long offset) {
    BLOCKS(n_blocks) {
        const u8* p = raw + b * 110;
        const u8* hm = p;
        const u8* q = p + 32;
        const u8* s12 = p + 96;
        const float d = f16_to_f32(rd16(p + 108));
        // the 16 scales: low 4 bits from bytes 0-7, high 2 bits from bytes 8-11
        int scales[16];
        for (int i = 0; i < 16; i++) {
            const int low = (i < 8) ? (s12[i] & 15) : (s12[i - 8] >> 4);
            const int high = (s12[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
            scales[i] = (low | (high << 4)) - 32;
        }
        bf16* y = out + offset + b * 256;
        int is = 0, k = 0;
        unsigned int m = 1;
        for (int n = 0; n < 256; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int half = 0; half < 2; half++) {
                    const float dl = d * scales[is++];
                    for (int l = 0; l < 16; l++) {
                        const int i = l + 16 * half;
                        const int v = (int)((q[i] >> shift) & 3) - ((hm[i] & m) ? 0 : 4);
                        y[k++] = f32_to_bf16(dl * v);
                    }
                }
            }
        }
    }
}

// Float weights: F32, F16 and BF16 elements, one thread each (n_blocks = elements).
extern "C" __global__ void dequant_f32_bf16(const u8* raw, long long n, bf16* out,
                                            long long offset) {
    BLOCKS(n) out[offset + b] = f32_to_bf16(__uint_as_float(rd32(raw + 4 * b)));
}

extern "C" __global__ void dequant_f16_bf16(const u8* raw, long long n, bf16* out,
                                            long long offset) {
    BLOCKS(n) out[offset + b] = f32_to_bf16(f16_to_f32(rd16(raw + 2 * b)));
}

extern "C" __global__ void dequant_bf16_bf16(const u8* raw, long long n, bf16* out,
                                             long long offset) {
    BLOCKS(n) out[offset + b] = (bf16)rd16(raw + 2 * b);
}
