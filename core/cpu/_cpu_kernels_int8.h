/* 8- and 4-bit weights times int8 activations (included once by _cpu_kernels.c).
 *
 * The packed layout (core.cpu.quantized.pack makes it from MLX's): per block of 16 output columns, for every 32-bit
 * word of inputs (4 inputs at 8 bits, 8 at 4 bits), 64 bytes: that word of each of the 16 columns; scales and
 * biases per block and group as 16 floats. A decoder step's few rows are quantized per row and group of inputs to
 * int8 (scale max|a| / 127), and 4 inputs of one row meet 16 columns in one vpdpbusd (64 multiply-adds, unsigned
 * weights times signed activations). At 4 bits a word's low nibbles are its even inputs and its high nibbles its
 * odd ones, so each word is two vpdpbusd, on the activations reordered to match (evens, then odds, per 8). The
 * integer sums of a group are scaled once, and the bias term needs only the rows' float sums:
 *
 *     C[m, n] = sum over groups g of  sa[m, g] (scale[n, g] sum_k ia[m, k] q[n, k]  +  bias[n, g] sum_k ia[m, k])
 *
 * that is, the exact product of the rounded activations sa[m, g] ia[m, k] with the dequantised weights. At 8 rows
 * the float kernel (quantized_matmul) spends a float multiply-add per weight and row; this one a quarter of an
 * instruction. The layout keeps MLX's shapes and bytes (a (16, K · bits / 32) block of uint32 words stored
 * transposed), so a layer's arrays are rearranged in place of MLX's, not copied. */

#define PACK_COLUMNS 16
#define PACK_PREFETCH 8192 /* bytes ahead in the weights: streaming 450 MB, 8 rows took 32 ms in one thread
                            without it, 16 ms with (the hardware prefetcher alone lags at this pace) */
#define PACK_MAX_MB 8 /* rows per pass: 8 integer and 8 float accumulators of 16 lanes */

typedef struct packed_s {
    const quant_kernel_t *kernel;
    int M, K, bits, G, count, ldc, ldi; /* ldi: the stride of ia's rows */
    int first[QUANT_MAX_MATRICES + 1]; /* matrix j has output columns first[j] .. first[j + 1] - 1 */
    const int8_t *ia;                  /* (M, K) in rows of ldi: A quantized */
    const float *sa, *asum;            /* (M, K / G): its scales, and the sums of its groups (times sa) */
    const uint8_t *const *W;
    const float *const *S, *const *B;
    float *C;
} packed_t;

/* ia, sa and asum of A (M, K), per row and group of G; rounded to nearest. asum is the sum of the rounded values
 * (times sa), not of A's: the bias term must see the activations the integer sums saw, or the rounding errors of a
 * group meet its bias (about the group's largest weight) unbalanced (measured: 3x the error). */
static void quantize_rows_int8(int M, int K, int G, const float *restrict A, int8_t *restrict ia, int ldi,
                               float *restrict sa, float *restrict asum) {
    const int groups = K / G;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            const float *restrict a = A + (size_t)m * K + (size_t)g * G;
            float amax = 0.f;
            for (int k = 0; k < G; k++) {
                float v = fabsf(a[k]);
                amax = v > amax ? v : amax;
            }
            const float inv = amax > 0 ? 127.f / amax : 0.f;
            int8_t *restrict out = ia + (size_t)m * ldi + (size_t)g * G;
            int sum = 0;
            for (int k = 0; k < G; k++) {
                /* |x| <= 127, rounded to nearest even by adding and taking away 1.5 * 2^23 (exact in float32 for
                   |x| < 2^22; a loop the compiler vectorises, where rintf is a call without SSE4.1) */
                float x = a[k] * inv;
                int v = (int)((x + 12582912.f) - 12582912.f);
                out[k] = (int8_t)v;
                sum += v;
            }
            sa[(size_t)m * groups + g] = amax / 127.f;
            asum[(size_t)m * groups + g] = (float)sum * (amax / 127.f);
        }
}

/* The same arithmetic in plain C, for CPUs without VNNI (and for the tests, which compare the two). */
static void packed_block_portable(const packed_t *p, int j, int nb, int m0, int mb) {
    const int K = p->K, G = p->G, groups = K / G, per_word = 32 / p->bits;
    const uint8_t *w = p->W[j] + (size_t)nb * K * p->bits / 8 * PACK_COLUMNS;
    const float *s = p->S[j] + (size_t)nb * groups * PACK_COLUMNS, *b = p->B[j] + (size_t)nb * groups * PACK_COLUMNS;
    for (int m = m0; m < m0 + mb; m++) {
        float acc[PACK_COLUMNS] = {0};
        float *out = p->C + (size_t)m * p->ldc + p->first[j] + (size_t)nb * PACK_COLUMNS;
        const int8_t *ia = p->ia + (size_t)m * p->ldi;
        for (int g = 0; g < groups; g++) {
            int32_t isum[PACK_COLUMNS] = {0};
            for (int t = g * G / per_word; t < (g + 1) * G / per_word; t++)
                for (int c = 0; c < PACK_COLUMNS; c++) {
                    const uint8_t *word = w + ((size_t)t * PACK_COLUMNS + c) * 4;
                    for (int i = 0; i < 4; i++)
                        if (p->bits == 8)
                            isum[c] += (int32_t)word[i] * ia[4 * t + i];
                        else
                            isum[c] += (int32_t)(word[i] & 15) * ia[8 * t + i] + (int32_t)(word[i] >> 4) * ia[8 * t + 4 + i];
                }
            float scale = p->sa[(size_t)m * groups + g], sum = p->asum[(size_t)m * groups + g];
            for (int c = 0; c < PACK_COLUMNS; c++)
                acc[c] += (float)isum[c] * (s[g * PACK_COLUMNS + c] * scale) + b[g * PACK_COLUMNS + c] * sum;
        }
        memcpy(out, acc, sizeof acc);
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* MB rows and BITS (constants in every instance) of one block of 16 columns: each 64-byte vector of weights meets
 * every row's 4 inputs (one int32 broadcast) in a vpdpbusd, at 4 bits its low and its high nibbles in one each; a
 * group's integer sums are scaled into float accumulators. */
VNNI_TARGET static inline __attribute__((always_inline)) void
packed_rows_vnni(const packed_t *p, int j, int nb, int m0, const int MB, const int BITS) {
    const int K = p->K, G = p->G, groups = K / G, per_word = 32 / BITS;
    const uint8_t *w = p->W[j] + (size_t)nb * K * BITS / 8 * PACK_COLUMNS;
    const float *s = p->S[j] + (size_t)nb * groups * PACK_COLUMNS, *b = p->B[j] + (size_t)nb * groups * PACK_COLUMNS;
    const int8_t *ia = p->ia + (size_t)m0 * p->ldi;
    const float *sa = p->sa + (size_t)m0 * groups, *asum = p->asum + (size_t)m0 * groups;
    float *out = p->C + (size_t)m0 * p->ldc + p->first[j] + (size_t)nb * PACK_COLUMNS;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[PACK_MAX_MB];
    for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i isum[PACK_MAX_MB];
        for (int m = 0; m < MB; m++) isum[m] = _mm512_setzero_si512();
        for (int t = g * G / per_word; t < (g + 1) * G / per_word; t++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)t * 64));
            _mm_prefetch((const char *)(w + (size_t)t * 64 + PACK_PREFETCH), _MM_HINT_T0);
            if (BITS == 8) {
                for (int m = 0; m < MB; m++) {
                    int32_t four;
                    memcpy(&four, ia + (size_t)m * p->ldi + 4 * t, 4);
                    isum[m] = _mm512_dpbusd_epi32(isum[m], wv, _mm512_set1_epi32(four));
                }
            } else {
                __m512i low = _mm512_and_si512(wv, nibble), high = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble);
                for (int m = 0; m < MB; m++) {
                    int32_t even, odd;
                    memcpy(&even, ia + (size_t)m * p->ldi + 8 * t, 4);
                    memcpy(&odd, ia + (size_t)m * p->ldi + 8 * t + 4, 4);
                    isum[m] = _mm512_dpbusd_epi32(isum[m], low, _mm512_set1_epi32(even));
                    isum[m] = _mm512_dpbusd_epi32(isum[m], high, _mm512_set1_epi32(odd));
                }
            }
        }
        __m512 sv = _mm512_loadu_ps(s + g * PACK_COLUMNS), bv = _mm512_loadu_ps(b + g * PACK_COLUMNS);
        for (int m = 0; m < MB; m++) {
            __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(sa[(size_t)m * groups + g]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), scale, acc[m]);
            acc[m] = _mm512_fmadd_ps(bv, _mm512_set1_ps(asum[(size_t)m * groups + g]), acc[m]);
        }
    }
    for (int m = 0; m < MB; m++) _mm512_storeu_ps(out + (size_t)m * p->ldc, acc[m]);
}

/* quantize_rows_int8 in AVX-512 (the same results: rounding to nearest even, exact sums), for G a multiple of 16;
 * the plain loop took 0.8 ns a value, a quarter of the product's time at 8 rows. */
VNNI_TARGET static void quantize_rows_int8_avx512(int M, int K, int G, const float *restrict A, int8_t *restrict ia,
                                                  int ldi, float *restrict sa, float *restrict asum) {
    if (G % 16 || G > 256) {
        quantize_rows_int8(M, K, G, A, ia, ldi, sa, asum);
        return;
    }
    const int groups = K / G, vectors = G / 16;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            const float *a = A + (size_t)m * K + (size_t)g * G;
            __m512 x[16], top = _mm512_setzero_ps();
            for (int v = 0; v < vectors; v++) {
                x[v] = _mm512_loadu_ps(a + 16 * v);
                top = _mm512_max_ps(top, _mm512_abs_ps(x[v]));
            }
            float amax = _mm512_reduce_max_ps(top);
            __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
            __m512i sum = _mm512_setzero_si512();
            int8_t *out = ia + (size_t)m * ldi + (size_t)g * G;
            for (int v = 0; v < vectors; v++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x[v], inv)); /* MXCSR's rounding: nearest even */
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i *)(out + 16 * v), _mm512_cvtsepi32_epi8(q));
            }
            sa[(size_t)m * groups + g] = amax / 127.f;
            asum[(size_t)m * groups + g] = (float)_mm512_reduce_add_epi32(sum) * (amax / 127.f);
        }
}

#define PACKED_ROWS(BITS)                                          \
    switch (mb) {                                                  \
    case 1: packed_rows_vnni(p, j, nb, m0, 1, BITS); break;        \
    case 2: packed_rows_vnni(p, j, nb, m0, 2, BITS); break;        \
    case 3: packed_rows_vnni(p, j, nb, m0, 3, BITS); break;        \
    case 4: packed_rows_vnni(p, j, nb, m0, 4, BITS); break;        \
    case 5: packed_rows_vnni(p, j, nb, m0, 5, BITS); break;        \
    case 6: packed_rows_vnni(p, j, nb, m0, 6, BITS); break;        \
    case 7: packed_rows_vnni(p, j, nb, m0, 7, BITS); break;        \
    default: packed_rows_vnni(p, j, nb, m0, 8, BITS); break;       \
    }

VNNI_TARGET static void packed_block_vnni(const packed_t *p, int j, int nb, int m0, int mb) {
    if (p->bits == 8) {
        PACKED_ROWS(8)
    } else {
        PACKED_ROWS(4)
    }
}
#undef PACKED_ROWS
#undef VNNI_TARGET

#define AVX2_TARGET __attribute__((target("avx2,fma")))
/* Rows per pass, each with its int16, int32 and float accumulators in the 16 registers: at 8 bits two int16 sums a
 * row, so 3 (with 4, two of them went to the stack: 8 rows took 1.25x as long on Zen 3), at 4 bits one, so 4. */
#define AVX2_ROWS_8 3
#define AVX2_ROWS_4 4
#define AVX2_MAX_MB 4

/* AVX2 has no vpdpbusd. Its vpmaddubsw multiplies unsigned by signed bytes and sums pairs into saturating int16,
 * which a full 8-bit weight would overflow (255 · 127 · 2 > 32767), so weights go in as nibbles (15 · 127 · 2 =
 * 3810 a pair): at 8 bits a byte's low and high nibbles meet the same input, the high sum counted 16 times; at 4
 * bits they meet the even and the odd inputs, as in the VNNI kernel. int16 sums stay exact for 8 words (4 at 4
 * bits, two products a word) and are then widened by vpmaddwd, so the integer sums are exactly VNNI's. One half of
 * a block (8 columns) at a time; MB and BITS are constants in every instance. */
AVX2_TARGET static inline __attribute__((always_inline)) void
packed_rows_avx2(const packed_t *p, int j, int nb, int m0, const int MB, const int BITS) {
    const int K = p->K, G = p->G, groups = K / G, words = G * BITS / 32, chunk = BITS == 8 ? 8 : 4;
    const uint8_t *w = p->W[j] + (size_t)nb * K * BITS / 8 * PACK_COLUMNS;
    const float *s = p->S[j] + (size_t)nb * groups * PACK_COLUMNS, *b = p->B[j] + (size_t)nb * groups * PACK_COLUMNS;
    const int8_t *ia = p->ia + (size_t)m0 * p->ldi;
    const float *sa = p->sa + (size_t)m0 * groups, *asum = p->asum + (size_t)m0 * groups;
    float *out = p->C + (size_t)m0 * p->ldc + p->first[j] + (size_t)nb * PACK_COLUMNS;
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    for (int half = 0; half < 2; half++) {
        const uint8_t *wh = w + 32 * half;
        __m256 acc[AVX2_MAX_MB];
        for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256i isum[AVX2_MAX_MB];
            for (int m = 0; m < MB; m++) isum[m] = _mm256_setzero_si256();
            for (int t0 = g * words; t0 < (g + 1) * words; t0 += chunk) {
                const int t1 = t0 + chunk < (g + 1) * words ? t0 + chunk : (g + 1) * words;
                __m256i lo16[AVX2_MAX_MB], hi16[AVX2_MAX_MB];
                for (int m = 0; m < MB; m++) lo16[m] = hi16[m] = _mm256_setzero_si256();
                for (int t = t0; t < t1; t++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wh + (size_t)t * 64));
                    if (half == 0) _mm_prefetch((const char *)(w + (size_t)t * 64 + PACK_PREFETCH), _MM_HINT_T0);
                    __m256i low = _mm256_and_si256(wv, nibble), high = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
                    for (int m = 0; m < MB; m++) {
                        int32_t first, second;
                        if (BITS == 8) {
                            memcpy(&first, ia + (size_t)m * p->ldi + 4 * t, 4);
                            __m256i a = _mm256_set1_epi32(first);
                            lo16[m] = _mm256_add_epi16(lo16[m], _mm256_maddubs_epi16(low, a));
                            hi16[m] = _mm256_add_epi16(hi16[m], _mm256_maddubs_epi16(high, a));
                        } else {
                            memcpy(&first, ia + (size_t)m * p->ldi + 8 * t, 4);
                            memcpy(&second, ia + (size_t)m * p->ldi + 8 * t + 4, 4);
                            lo16[m] = _mm256_add_epi16(lo16[m], _mm256_maddubs_epi16(low, _mm256_set1_epi32(first)));
                            lo16[m] = _mm256_add_epi16(lo16[m], _mm256_maddubs_epi16(high, _mm256_set1_epi32(second)));
                        }
                    }
                }
                for (int m = 0; m < MB; m++) {
                    isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(lo16[m], ones));
                    if (BITS == 8) isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(hi16[m], sixteen));
                }
            }
            __m256 sv = _mm256_loadu_ps(s + g * PACK_COLUMNS + 8 * half), bv = _mm256_loadu_ps(b + g * PACK_COLUMNS + 8 * half);
            for (int m = 0; m < MB; m++) {
                __m256 scale = _mm256_mul_ps(sv, _mm256_set1_ps(sa[(size_t)m * groups + g]));
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), scale, acc[m]);
                acc[m] = _mm256_fmadd_ps(bv, _mm256_set1_ps(asum[(size_t)m * groups + g]), acc[m]);
            }
        }
        for (int m = 0; m < MB; m++) _mm256_storeu_ps(out + (size_t)m * p->ldc + 8 * half, acc[m]);
    }
}

#define PACKED_ROWS_AVX2(BITS, MAX)                                      \
    for (int m = m0; m < m0 + mb; m += MAX) {                            \
        const int rows = m0 + mb - m < MAX ? m0 + mb - m : MAX;          \
        switch (rows) {                                                  \
        case 1: packed_rows_avx2(p, j, nb, m, 1, BITS); break;           \
        case 2: packed_rows_avx2(p, j, nb, m, 2, BITS); break;           \
        case 3: packed_rows_avx2(p, j, nb, m, 3, BITS); break;           \
        default: packed_rows_avx2(p, j, nb, m, MAX, BITS); break;        \
        }                                                                \
    }

/* A block's rows in passes of AVX2_ROWS_8 or AVX2_ROWS_4: the block's weights (16 to 64 kB) are read again from
 * the caches. */
AVX2_TARGET static void packed_block_avx2(const packed_t *p, int j, int nb, int m0, int mb) {
    if (p->bits == 8) {
        PACKED_ROWS_AVX2(8, AVX2_ROWS_8)
    } else {
        PACKED_ROWS_AVX2(4, AVX2_ROWS_4)
    }
}
#undef PACKED_ROWS_AVX2

/* quantize_rows_int8 in AVX2 (the same results), for G a multiple of 8. */
AVX2_TARGET static void quantize_rows_int8_avx2(int M, int K, int G, const float *restrict A, int8_t *restrict ia,
                                                int ldi, float *restrict sa, float *restrict asum) {
    if (G % 8) {
        quantize_rows_int8(M, K, G, A, ia, ldi, sa, asum);
        return;
    }
    const int groups = K / G;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            const float *a = A + (size_t)m * K + (size_t)g * G;
            __m256 top = _mm256_setzero_ps();
            for (int k = 0; k < G; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(a + k)));
            __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
            t4 = _mm_max_ss(t4, _mm_shuffle_ps(t4, t4, 1));
            const float amax = _mm_cvtss_f32(t4);
            const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.f / amax : 0.f);
            __m256i sum = _mm256_setzero_si256();
            int8_t *o = ia + (size_t)m * ldi + (size_t)g * G;
            for (int k = 0; k < G; k += 8) {
                __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + k), inv)); /* nearest even */
                sum = _mm256_add_epi32(sum, q);
                __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_storel_epi64((__m128i *)(o + k), _mm_packs_epi16(q16, q16));
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            sa[(size_t)m * groups + g] = amax / 127.f;
            asum[(size_t)m * groups + g] = (float)_mm_cvtsi128_si32(s4) * (amax / 127.f);
        }
}
#undef AVX2_TARGET
#endif
