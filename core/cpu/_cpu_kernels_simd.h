/*
 * The arithmetic of core/cpu/_cpu_kernels.c for one vector width. That file includes this one once per instruction
 * set (AVX-512, AVX2, and the baseline), with
 *   LANES    floats per vector: 16, 8 or 4;
 *   MAX_MB   rows of A one pass of the product kernels keeps in registers (8 with 32 vector registers, else 4);
 *   SUFFIX   appended to every name defined here.
 * It defines skinny_columns##SUFFIX and attention_part##SUFFIX.
 *
 * Every output of a product is summed in the same order whatever the number of rows and the blocking (LANES
 * partial sums over K, then across), so a row's result does not depend on the rows it is multiplied with.
 */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

#define vf FN(vf_)
#define vi FN(vi_)
typedef float vf __attribute__((vector_size(LANES * 4), aligned(4)));  /* unaligned vectors */
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(4)));

/* B^T rows per block, which every pass over A's rows after the first takes from cache; a multiple of 2, 3 and 4.
 * All of a musicgen-small step's products at 16 rows: blocks of 48 102 ms, 96 109 ms, 192 112 ms. */
#define COLUMN_BLOCK 48

static inline float FN(hsum)(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i += 4) s += (v[i] + v[i + 2]) + (v[i + 1] + v[i + 3]);
    return s;
}

/* C[m, n] = sum_k A[m, k] * B[n, k] for n in [n0, n1): A is MB x K contiguous, B rows have stride ldb.
 * MB rows of A and R rows of B at a time; MB and R are constants in every instance, so the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void
FN(dot_rows)(int MB, int R, int K, const float *A, const float *B, int ldb, float *C, int ldc, int n0, int n1,
             float alpha, float beta) {
    const int KV = K - K % LANES;
    int n = n0;
    for (; n + R <= n1; n += R) {
        vf acc[MAX_MB][4] = {{{0}}};
        for (int k = 0; k < KV; k += LANES) {
            vf w[4];
            for (int r = 0; r < R; r++) {
                const float *b = B + (size_t)(n + r) * ldb + k;
                __builtin_prefetch(b + PREFETCH_FLOATS);
                w[r] = *(const vf *)b;
            }
            for (int m = 0; m < MB; m++) {
                vf a = *(const vf *)(A + (size_t)m * K + k);
                for (int r = 0; r < R; r++) acc[m][r] += a * w[r];
            }
        }
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) {
                float s = FN(hsum)(acc[m][r]);
                for (int k = KV; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)(n + r) * ldb + k];
                store(C + (size_t)m * ldc + n + r, s, alpha, beta);
            }
    }
    for (; n < n1; n++) /* fewer than R columns left */
        for (int m = 0; m < MB; m++) {
            vf acc = {0};
            for (int k = 0; k < KV; k += LANES)
                acc += *(const vf *)(A + (size_t)m * K + k) * *(const vf *)(B + (size_t)n * ldb + k);
            float s = FN(hsum)(acc);
            for (int k = KV; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)n * ldb + k];
            store(C + (size_t)m * ldc + n, s, alpha, beta);
        }
}

/* C[m, n] = sum_k A[m, k] * B[k, n] for n in [n0, n1): B is K x N with row stride ldb (rows of B are axpy'd).
 * V vectors of columns at a time (V LANES-wide vectors for each of MB <= 4 rows). */
#define AXPY_V (LANES == 16 ? 4 : 2)
static inline __attribute__((always_inline)) void
FN(axpy_rows)(int MB, int K, const float *A, const float *B, int ldb, float *C, int ldc, int n0, int n1,
              float alpha, float beta) {
    const int width = AXPY_V * LANES;
    int n = n0;
    for (; n + width <= n1; n += width) {
        vf acc[4][AXPY_V] = {{{0}}};
        for (int k = 0; k < K; k++) {
            const float *b = B + (size_t)k * ldb + n;
            vf w[AXPY_V];
            for (int j = 0; j < AXPY_V; j++) w[j] = *(const vf *)(b + j * LANES);
            for (int m = 0; m < MB; m++) {
                float a = A[(size_t)m * K + k];
                for (int j = 0; j < AXPY_V; j++) acc[m][j] += a * w[j];
            }
        }
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < width; j++)
                store(C + (size_t)m * ldc + n + j, acc[m][j / LANES][j % LANES], alpha, beta);
    }
    for (; n + LANES <= n1; n += LANES) {
        vf acc[4] = {{0}};
        for (int k = 0; k < K; k++) {
            vf w = *(const vf *)(B + (size_t)k * ldb + n);
            for (int m = 0; m < MB; m++) acc[m] += A[(size_t)m * K + k] * w;
        }
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < LANES; j++) store(C + (size_t)m * ldc + n + j, acc[m][j], alpha, beta);
    }
    for (; n < n1; n++)
        for (int m = 0; m < MB; m++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)k * ldb + n];
            store(C + (size_t)m * ldc + n, s, alpha, beta);
        }
}

/* Rows [0, mb) of A against B^T columns [n0, n1), mb <= MAX_MB, as many B rows at a time as keep the MB x R
 * accumulators in registers. */
static inline __attribute__((always_inline)) void
FN(dot_pass)(int mb, int K, const float *A, const float *B, int ldb, float *C, int ldc, int n0, int n1,
             float alpha, float beta) {
#if MAX_MB == 8 /* 32 registers; 4 B rows from 5 A rows on although the compiler then spills some accumulators:
                  all of a musicgen-small step's products at 8 rows took 62-63 ms so, 69-72 ms with 3 B rows */
    switch (mb) {
    case 1: FN(dot_rows)(1, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 2: FN(dot_rows)(2, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 3: FN(dot_rows)(3, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 4: FN(dot_rows)(4, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 5: FN(dot_rows)(5, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 6: FN(dot_rows)(6, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 7: FN(dot_rows)(7, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    default: FN(dot_rows)(8, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    }
#else /* 16 registers: at most 12 accumulators */
    switch (mb) {
    case 1: FN(dot_rows)(1, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 2: FN(dot_rows)(2, 4, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    case 3: FN(dot_rows)(3, 3, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    default: FN(dot_rows)(4, 3, K, A, B, ldb, C, ldc, n0, n1, alpha, beta); break;
    }
#endif
}

/* Columns [n0, n1) of C = alpha * A B(^T) + beta * C, for M <= SKINNY_MAX_ROWS rows of contiguous A. More rows than
 * one pass holds are taken in passes over a block of columns at a time, so B is streamed from memory once. */
static void FN(skinny_columns)(int transB, int M, int K, const float *A, const float *B, int ldb, float *C, int ldc,
                               int n0, int n1, float alpha, float beta) {
    const int passes = transB ? MAX_MB : 4, block = M <= passes ? n1 - n0 : COLUMN_BLOCK;
    for (int b0 = n0; b0 < n1; b0 += block) {
        int b1 = n1 - b0 < block ? n1 : b0 + block;
        for (int m0 = 0; m0 < M; m0 += passes) {
            int mb = M - m0 < passes ? M - m0 : passes;
            const float *a = A + (size_t)m0 * K;
            float *c = C + (size_t)m0 * ldc;
            if (transB) {
                FN(dot_pass)(mb, K, a, B, ldb, c, ldc, b0, b1, alpha, beta);
            } else {
                switch (mb) {
                case 1: FN(axpy_rows)(1, K, a, B, ldb, c, ldc, b0, b1, alpha, beta); break;
                case 2: FN(axpy_rows)(2, K, a, B, ldb, c, ldc, b0, b1, alpha, beta); break;
                case 3: FN(axpy_rows)(3, K, a, B, ldb, c, ldc, b0, b1, alpha, beta); break;
                default: FN(axpy_rows)(4, K, a, B, ldb, c, ldc, b0, b1, alpha, beta); break;
                }
            }
        }
    }
}

/* exp(x): x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), e^r by a degree-7 polynomial (Cephes expf,
 * relative error ~2e-7), 2^n put in the exponent bits; 0 below -87.3, where float32 exp underflows.
 * Only ever called with x <= 0 (scores minus their maximum), so nothing overflows. */
static inline vf FN(exp_negative)(vf x) {
    vi under = x < -87.3f;
    x = (vf)((vi)x & ~under); /* 0 there, masked out of the result below */
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2), in float */
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vf two_n = (vf)((__builtin_convertvector(n, vi) + 127) << 23);
    return (vf)((vi)(p * two_n) & ~under);
}

/* LANES float16 values (IEEE half) as floats: one vcvtph2ps where the instruction set has it (a generic vector
 * conversion is done element by element), else _Float16's own conversion. */
static inline __attribute__((always_inline)) vf FN(load_half)(const uint16_t *p) {
#if LANES == 16 && defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif LANES == 8 && defined(__F16C__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vf v;
    for (int i = 0; i < LANES; i++) v[i] = (float)((const _Float16 *)p)[i];
    return v;
#endif
}

/* n floats rounded to the nearest float16 */
static inline void FN(store_half)(int n, const float *x, uint16_t *p) {
    int i = 0;
#if LANES == 16 && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(p + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif LANES == 8 && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) ((_Float16 *)p)[i] = (_Float16)x[i];
}

/* LANES keys or values from float32 (half 0) or float16 (half 1) memory, `index` elements in */
static inline __attribute__((always_inline)) vf FN(load_kv)(const void *base, size_t index, int half) {
    return half ? FN(load_half)((const uint16_t *)base + index) : *(const vf *)((const float *)base + index);
}

static inline __attribute__((always_inline)) float FN(kv_at)(const void *base, size_t index, int half) {
    return half ? (float)((const _Float16 *)base)[index] : ((const float *)base)[index];
}

/* softmax(q kᵀ · scale) v over positions 0 .. L-1 of one (row, head) where `mask` (if any) is nonzero; k and v
 * float32 or (half) float16; D and half constants in the hot instances. `scores` holds L rounded up to LANES
 * floats. */
static inline __attribute__((always_inline)) void
FN(attend)(int D, int L, float scale, const float *q, const void *k, const void *v, int half, const uint8_t *mask,
           float *scores, float *out) {
    const int DV = D / LANES, tail_start = DV * LANES;
    const int bytes = half ? 2 : 4;
    vf qv[ATTENTION_MAX_HEAD / LANES];
    for (int c = 0; c < DV; c++) qv[c] = *(const vf *)(q + LANES * c) * scale;
    float best = -__builtin_inff();
    for (int t = 0; t < L; t++) {
        const size_t kt = (size_t)t * D;
        for (int d = 0; d < D * bytes; d += 64) __builtin_prefetch((const char *)k + (kt + ATTENTION_PREFETCH * D) * bytes + d);
        vf acc = {0};
        for (int c = 0; c < DV; c++) acc += qv[c] * FN(load_kv)(k, kt + LANES * c, half);
        float x = FN(hsum)(acc);
        for (int d = tail_start; d < D; d++) x += q[d] * scale * FN(kv_at)(k, kt + d, half);
        if (mask && !mask[t]) x = -__builtin_inff();
        scores[t] = x;
        best = x > best ? x : best;
    }
    if (best == -__builtin_inff()) { /* attends nowhere: uniformly everywhere, as an additive mask would */
        for (int t = 0; t < L; t++) scores[t] = 0.0f;
        best = 0.0f;
    }
    int padded = (L + LANES - 1) / LANES * LANES;
    for (int t = L; t < padded; t++) scores[t] = -__builtin_inff();
    vf total = {0};
    for (int t = 0; t < padded; t += LANES) {
        vf e = FN(exp_negative)(*(vf *)(scores + t) - best);
        *(vf *)(scores + t) = e;
        total += e;
    }
    float inv = 1.0f / FN(hsum)(total);
    vf o[ATTENTION_MAX_HEAD / LANES];
    float tail[LANES] = {0};
    for (int c = 0; c < DV; c++) o[c] = (vf){0};
    for (int t = 0; t < L; t++) {
        const size_t vt = (size_t)t * D;
        for (int d = 0; d < D * bytes; d += 64) __builtin_prefetch((const char *)v + (vt + ATTENTION_PREFETCH * D) * bytes + d);
        float w = scores[t];
        for (int c = 0; c < DV; c++) o[c] += w * FN(load_kv)(v, vt + LANES * c, half);
        for (int d = tail_start; d < D; d++) tail[d - tail_start] += w * FN(kv_at)(v, vt + d, half);
    }
    for (int c = 0; c < DV; c++) *(vf *)(out + LANES * c) = o[c] * inv;
    for (int d = tail_start; d < D; d++) out[d] = tail[d - tail_start] * inv;
}

/* (row, head) pairs [first, last) of a decode_attention or cross_attention call. */
static void FN(attention_rows)(const attention_t *a, int first, int last, float *scores) {
    const size_t bytes = a->half ? 2 : 4, last_position = (size_t)(a->L - 1) * a->D;
    for (int bh = first; bh < last; bh++) {
        size_t row = (size_t)bh * a->D, offset = (size_t)bh * a->capacity * a->D;
        char *k = (char *)a->k_cache + offset * bytes, *v = (char *)a->v_cache + offset * bytes;
        const uint8_t *mask = a->mask ? a->mask + (size_t)(bh / a->heads) * a->capacity : NULL;
        if (a->k_new && a->half) {
            FN(store_half)(a->D, a->k_new + row, (uint16_t *)k + last_position);
            FN(store_half)(a->D, a->v_new + row, (uint16_t *)v + last_position);
        } else if (a->k_new) {
            memcpy((float *)k + last_position, a->k_new + row, sizeof(float) * a->D);
            memcpy((float *)v + last_position, a->v_new + row, sizeof(float) * a->D);
        }
        if (a->D == 64 && a->half)
            FN(attend)(64, a->L, a->scale, a->q + row, k, v, 1, mask, scores, a->out + row);
        else if (a->D == 64)
            FN(attend)(64, a->L, a->scale, a->q + row, k, v, 0, mask, scores, a->out + row);
        else
            FN(attend)(a->D, a->L, a->scale, a->q + row, k, v, a->half, mask, scores, a->out + row);
    }
}

/* ------------------------------------------------------------------------------------------ quantized weights
 * MLX's affine layout (mx.quantize): each weight row is K values of `bits` bits packed into uint32 words, element i
 * of a word at bits i*bits (little-endian, so for 8 bits byte k is element k, for 4 bits byte k/2 holds element k in
 * its low nibble when k is even, in its high nibble when odd), with one float32 scale and bias per group of G
 * values: w = q * scale + bias. The weights are dequantised in registers, never in memory, and each dequantised
 * vector meets every row of A there. For 4 bits A comes de-interleaved in blocks of 2 * LANES (even elements, then
 * odd: quant_permute below), so a vector of low nibbles meets the even elements and one of high nibbles the odd. */

/* LANES bytes, zero-extended to int32 lanes (one vpmovzxbd; a generic vector conversion is done byte by byte) */
static inline __attribute__((always_inline)) vi FN(load_u8)(const uint8_t *p) {
#if LANES == 16 && defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif LANES == 8 && defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi v;
    for (int i = 0; i < LANES; i++) v[i] = p[i];
    return v;
#endif
}

static void FN(quant_permute)(int M, int K, const float *A, float *out) {
    for (int m = 0; m < M; m++)
        for (int k0 = 0; k0 < K; k0 += 2 * LANES)
            for (int j = 0; j < LANES; j++) {
                out[(size_t)m * K + k0 + j] = A[(size_t)m * K + k0 + 2 * j];
                out[(size_t)m * K + k0 + LANES + j] = A[(size_t)m * K + k0 + 2 * j + 1];
            }
}

/* C[m, n] for MB rows of A and columns [n0, n1), R columns at a time (MB, R, BITS constants in every instance). */
static inline __attribute__((always_inline)) void
FN(quant_rows)(int MB, int R, int BITS, int G, int K, const float *A, const uint8_t *W, const float *S,
               const float *Bi, float *C, int ldc, int n0, int n1) {
    const int groups = K / G;
    const size_t ldw = (size_t)K * BITS / 8;
    for (int n = n0; n + R <= n1; n += R) {
        vf acc[MAX_MB][4] = {{{0}}};
        for (int g = 0; g < groups; g++) {
            vf s[4], b[4];
            for (int r = 0; r < R; r++) {
                s[r] = (vf){0} + S[(size_t)(n + r) * groups + g];
                b[r] = (vf){0} + Bi[(size_t)(n + r) * groups + g];
                __builtin_prefetch(W + (size_t)(n + r) * ldw + (size_t)g * G * BITS / 8 + 1024);
            }
            const int k0 = g * G;
            if (BITS == 8) {
                for (int k = k0; k < k0 + G; k += LANES) {
                    vf w[4];
                    for (int r = 0; r < R; r++) {
                        vi q = FN(load_u8)(W + (size_t)(n + r) * ldw + k);
                        w[r] = __builtin_convertvector(q, vf) * s[r] + b[r];
                    }
                    for (int m = 0; m < MB; m++) {
                        vf a = *(const vf *)(A + (size_t)m * K + k);
                        for (int r = 0; r < R; r++) acc[m][r] += a * w[r];
                    }
                }
            } else {
                for (int k = k0; k < k0 + G; k += 2 * LANES) {
                    vf lo[4], hi[4];
                    for (int r = 0; r < R; r++) {
                        vi q = FN(load_u8)(W + (size_t)(n + r) * ldw + k / 2);
                        lo[r] = __builtin_convertvector(q & 15, vf) * s[r] + b[r];
                        hi[r] = __builtin_convertvector(q >> 4, vf) * s[r] + b[r];
                    }
                    for (int m = 0; m < MB; m++) {
                        vf a0 = *(const vf *)(A + (size_t)m * K + k), a1 = *(const vf *)(A + (size_t)m * K + k + LANES);
                        for (int r = 0; r < R; r++) {
                            acc[m][r] += a0 * lo[r];
                            acc[m][r] += a1 * hi[r];
                        }
                    }
                }
            }
        }
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) C[(size_t)m * ldc + n + r] = FN(hsum)(acc[m][r]);
    }
}

/* Rows [0, mb) of A, mb <= MAX_MB: 4 columns at a time while the accumulators fit the registers, else 2; one
 * at a time for the last few. */
static inline __attribute__((always_inline)) void
FN(quant_pass)(int mb, int BITS, int G, int K, const float *A, const uint8_t *W, const float *S, const float *Bi,
               float *C, int ldc, int n0, int n1) {
    switch (mb) {
#define QCASE(MBV)                                                                                                 \
    {                                                                                                              \
        enum { RV = (MBV) <= MAX_MB / 4 ? 4 : 2 };                                                                 \
        int end = n0 + (n1 - n0) / RV * RV;                                                                        \
        FN(quant_rows)(MBV, RV, BITS, G, K, A, W, S, Bi, C, ldc, n0, end);                                         \
        FN(quant_rows)(MBV, 1, BITS, G, K, A, W, S, Bi, C, ldc, end, n1);                                          \
        break;                                                                                                     \
    }
    case 1: QCASE(1)
    case 2: QCASE(2)
    case 3: QCASE(3)
#if MAX_MB == 8
    case 4: QCASE(4)
    case 5: QCASE(5)
    case 6: QCASE(6)
    case 7: QCASE(7)
#endif
    default: QCASE(MAX_MB)
#undef QCASE
    }
}

/* Columns [n0, n1) of C = A Wᵀ for M <= SKINNY_MAX_ROWS rows. More rows than one pass holds are taken in passes
 * over blocks of columns whose packed weights stay in cache, so the weights are read from memory once. */
static void FN(quant_columns)(int bits, int G, int M, int K, const float *A, const uint8_t *W, const float *S,
                              const float *Bi, float *C, int ldc, int n0, int n1) {
    const int block = M <= MAX_MB ? n1 - n0 : COLUMN_BLOCK;
    for (int b0 = n0; b0 < n1; b0 += block) {
        int b1 = n1 - b0 < block ? n1 : b0 + block;
        for (int m0 = 0; m0 < M; m0 += MAX_MB) {
            int mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
            if (bits == 8)
                FN(quant_pass)(mb, 8, G, K, A + (size_t)m0 * K, W, S, Bi, C + (size_t)m0 * ldc, ldc, b0, b1);
            else
                FN(quant_pass)(mb, 4, G, K, A + (size_t)m0 * K, W, S, Bi, C + (size_t)m0 * ldc, ldc, b0, b1);
        }
    }
}

/* x <- 0.5 x (1 + erf(x / sqrt 2)) for n floats, the exact GELU, with erf as the rational function Eigen and XLA
 * use for float32 (core/cpu/fast_ops.py erf_rational, within a few ulp). For the host-memory decoder step
 * (core/cpu/host_step.py), which would otherwise hand the array back to MLX for it. */
static void FN(gelu_inplace)(long n, float *x) {
    static const float P[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                               -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                               -1.60960333262415e-02f};
    static const float Q[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                               -7.37332916720468e-03f, -1.42647390514189e-02f};
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v = *(vf *)(x + i), z = v * 0.7071067811865476f;
        vi low = z < -4.0f, high = z > 4.0f; /* clip to [-4, 4] (C has no vector ?:) */
        z = (vf)(((vi)z & ~(low | high)) | ((vi)((vf){0} - 4.0f) & low) | ((vi)((vf){0} + 4.0f) & high));
        vf z2 = z * z, p = z2 * P[0] + P[1], q = z2 * Q[0] + Q[1];
        for (int c = 2; c < 7; c++) p = p * z2 + P[c];
        for (int c = 2; c < 5; c++) q = q * z2 + Q[c];
        *(vf *)(x + i) = 0.5f * v * (1.0f + z * p / q);
    }
    for (; i < n; i++) {
        float v = x[i], z = v * 0.7071067811865476f;
        z = z < -4.0f ? -4.0f : z > 4.0f ? 4.0f : z;
        float z2 = z * z, p = z2 * P[0] + P[1], q = z2 * Q[0] + Q[1];
        for (int c = 2; c < 7; c++) p = p * z2 + P[c];
        for (int c = 2; c < 5; c++) q = q * z2 + Q[c];
        x[i] = 0.5f * v * (1.0f + z * p / q);
    }
}

/* x <- ELU(x) (alpha 1: x where x > 0, else e^x - 1) for n floats, for EnCodec (core/cpu/encodec_numpy.py):
 * NumPy's expm1 is a scalar libm call per value on CPUs without AVX-512 (15% of a decode's time on an AVX2 CPU).
 * Below -0.5 e^x - 1 from exp_negative, above it expm1's Taylor series to x^8 (its terms past that are < 2e-8 of
 * the result there; e^x - 1 would lose relative accuracy near 0). */
static void FN(elu_inplace)(long n, float *x) {
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v = *(vf *)(x + i);
        vi positive = v > 0.0f;
        vf neg = (vf)((vi)v & ~positive); /* min(v, 0), NaN kept */
        vf p = neg * (1.0f / 40320) + 1.0f / 5040;
        p = p * neg + 1.0f / 720;
        p = p * neg + 1.0f / 120;
        p = p * neg + 1.0f / 24;
        p = p * neg + 1.0f / 6;
        p = p * neg + 0.5f;
        p = (p * neg) * neg + neg;
        vi small = neg > -0.5f;
        vf e = (vf)(((vi)p & small) | ((vi)(FN(exp_negative)(neg) - 1.0f) & ~small));
        *(vf *)(x + i) = (vf)(((vi)v & positive) | ((vi)e & ~positive));
    }
    for (; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : expm1f(x[i]);
}

/* out[m] = (x[m] - mean) / sqrt(var + eps) * weight + bias for M rows of K floats (the host-memory decoder step's
 * layer norms; NumPy took ~20 µs for 2 x 1024 values in 8 operations). Mean first, then the centred variance, in
 * float32 with LANES partial sums, as MLX's fused layer norm computes it. */
static void FN(layer_norm_rows)(int M, int K, const float *x, const float *weight, const float *bias, float eps,
                                float *out) {
    const int KV = K - K % LANES;
    for (int m = 0; m < M; m++) {
        const float *row = x + (size_t)m * K;
        float *o = out + (size_t)m * K;
        vf acc = {0};
        for (int k = 0; k < KV; k += LANES) acc += *(const vf *)(row + k);
        float sum = FN(hsum)(acc);
        for (int k = KV; k < K; k++) sum += row[k];
        float mean = sum / K;
        vf sq = {0};
        for (int k = 0; k < KV; k += LANES) {
            vf c = *(const vf *)(row + k) - mean;
            sq += c * c;
        }
        float var = FN(hsum)(sq);
        for (int k = KV; k < K; k++) var += (row[k] - mean) * (row[k] - mean);
        float inv = 1.0f / __builtin_sqrtf(var / K + eps);
        for (int k = 0; k < KV; k += LANES)
            *(vf *)(o + k) = (*(const vf *)(row + k) - mean) * inv * *(const vf *)(weight + k) + *(const vf *)(bias + k);
        for (int k = KV; k < K; k++) o[k] = (row[k] - mean) * inv * weight[k] + bias[k];
    }
}

#undef AXPY_V
#undef COLUMN_BLOCK
#undef vf
#undef vi
#undef FN
#undef CAT
#undef CAT_
