/*
 * The quantized product of core/cpu/_cpu_kernels.c for one vector width: out = x · dequantize(w)ᵀ for a few float32
 * rows x, w in MLX's own layout (`mx.quantize`: each output row packed LSB first in uint32 words, 32 / bits values a
 * word; per group of `group_size` values a float32 scale and bias, value = scale · q + bias).
 * That file includes this one once per instruction set, with LANES, MAX_MB and SUFFIX as for _cpu_kernels_simd.h.
 * It defines quantized_permute##SUFFIX and quantized_columns##SUFFIX.
 *
 * The packed weights are never unpacked in memory. A block is LANES consecutive words (PW = 32 / bits values each):
 * shifting the whole vector of words right by bits · j and masking gives, in lane l, value PW · l + j of the block.
 * So x is permuted once per call (quantized_permute) into the same order, and each vector of weights is
 * dequantised in registers (one shift, and, convert and multiply-add) and multiplied with every row.
 * A block covers E = PW · LANES values, which may span NG = E / group_size groups (1, 2 or 4): lane l then takes
 * the scale and bias of group PW · l / group_size of the block.
 * Every row's sums run in the same order whatever the rows around it (LANES partial sums, then across).
 */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

#define vf FN(qvf_)
#define vi FN(qvi_)
#define vu FN(qvu_)
typedef float vf __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4), aligned(4)));

/* B^T rows per block of columns when the rows take several passes: the packed block stays in cache between them */
#define QCOLUMN_BLOCK 32

static inline float FN(qhsum)(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i += 4) s += (v[i] + v[i + 2]) + (v[i + 1] + v[i + 3]);
    return s;
}

/* xp[m] = x[m] in block order (see above) for the whole blocks of K; the values past them stay in place. */
static void FN(quantized_permute)(int M, int K, int bits, const float *x, float *xp) {
    const int PW = 32 / bits, E = PW * LANES, KB = K - K % E;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float *pm = xp + (size_t)m * K;
        for (int k0 = 0; k0 < KB; k0 += E)
            for (int j = 0; j < PW; j++)
                for (int l = 0; l < LANES; l++) pm[k0 + j * LANES + l] = xm[k0 + PW * l + j];
        for (int k = KB; k < K; k++) pm[k] = xm[k];
    }
}

/* The scales (or biases) of one block as a vector: lane l gets s[PW · l / G], NG = E / G values from s; a shuffle
 * of one vector load where a whole vector lies before `end` (all but the last blocks of the matrix). */
static inline __attribute__((always_inline)) vf FN(lane_groups)(int NG, const float *s, const float *end) {
    if (NG <= 1) return (vf){0} + s[0];
    vi index;
    for (int l = 0; l < LANES; l++) index[l] = l * NG / LANES;
    if (s + LANES <= end) return __builtin_shuffle(*(const vf *)s, index);
    vf v;
    for (int l = 0; l < LANES; l++) v[l] = s[l * NG / LANES];
    return v;
}

/* out[m, n] for n in [n0, n1), MB rows at once, R weight rows at once; BITS and NG constants in every instance so the
 * accumulators stay in registers. xp is permuted, x is not (for the tail of K past the whole blocks). */
static inline __attribute__((always_inline)) void
FN(quantized_rows)(int MB, int R, int BITS, int NG, int K, int G, const float *xp, const float *x, const uint32_t *w,
                   const float *scales, const float *biases, float *out, int ldo, int n0, int n1) {
    const int PW = 32 / BITS, E = PW * LANES, KB = K - K % E, words = K / PW, groups = K / G;
    const uint32_t mask = (1u << BITS) - 1;
    /* prefetch the same place in later rows, at least 4 KB on (measured: a fixed 4 KB ahead fell behind for 4 KB rows) */
    const size_t ahead = (size_t)R * words * (1024 / (R * words) > 1 ? 1024 / (R * words) : 1);
    const float *scales_end = scales + (size_t)n1 * groups, *biases_end = biases + (size_t)n1 * groups;
    int n = n0;
    for (; n < n1; n += R) {
        const int r_here = n1 - n < R ? n1 - n : R; /* the last columns: fewer rows of w, same order of sums */
        vf acc[MAX_MB][2] = {{{0}}};
        for (int k0 = 0; k0 < KB; k0 += E) {
            vu q[2];
            vf s[2], b[2];
            for (int r = 0; r < R; r++) {
                int rr = r < r_here ? r : 0; /* a repeated row whose sums are dropped */
                const uint32_t *wr = w + (size_t)(n + rr) * words + k0 / PW;
                __builtin_prefetch(wr + ahead);
                q[r] = *(const vu *)wr;
                s[r] = FN(lane_groups)(NG, scales + (size_t)(n + rr) * groups + k0 / G, scales_end);
                b[r] = FN(lane_groups)(NG, biases + (size_t)(n + rr) * groups + k0 / G, biases_end);
            }
#pragma GCC unroll 8
            for (int j = 0; j < PW; j++) {
                vf wv[2];
                for (int r = 0; r < R; r++)
                    wv[r] = __builtin_convertvector((vi)((q[r] >> (uint32_t)(BITS * j)) & mask), vf) * s[r] + b[r];
                for (int m = 0; m < MB; m++) {
                    vf a = *(const vf *)(xp + (size_t)m * K + k0 + j * LANES);
                    for (int r = 0; r < R; r++) acc[m][r] += a * wv[r];
                }
            }
        }
        for (int r = 0; r < r_here; r++) {
            const uint32_t *wr = w + (size_t)(n + r) * words;
            const float *sr = scales + (size_t)(n + r) * groups, *br = biases + (size_t)(n + r) * groups;
            for (int m = 0; m < MB; m++) {
                float sum = FN(qhsum)(acc[m][r]);
                for (int k = KB; k < K; k++) {
                    float value = (float)((wr[k / PW] >> (BITS * (k % PW))) & mask) * sr[k / G] + br[k / G];
                    sum += x[(size_t)m * K + k] * value;
                }
                out[(size_t)m * ldo + n + r] = sum;
            }
        }
    }
}

#if MAX_MB == 8
#define QUANTIZED_MB(mb, R, BITS, NG)                                                                              \
    switch (mb) {                                                                                                  \
    case 1: FN(quantized_rows)(1, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 2: FN(quantized_rows)(2, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 3: FN(quantized_rows)(3, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 4: FN(quantized_rows)(4, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 5: FN(quantized_rows)(5, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 6: FN(quantized_rows)(6, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 7: FN(quantized_rows)(7, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    default: FN(quantized_rows)(8, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;          \
    }
#else
#define QUANTIZED_MB(mb, R, BITS, NG)                                                                              \
    switch (mb) {                                                                                                  \
    case 1: FN(quantized_rows)(1, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 2: FN(quantized_rows)(2, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    case 3: FN(quantized_rows)(3, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;           \
    default: FN(quantized_rows)(4, R, BITS, NG, K, G, xp, x, w, scales, biases, out, ldo, n0, n1); break;          \
    }
#endif

/* One pass: rows [0, mb) against columns [n0, n1), mb <= MAX_MB. */
static void FN(quantized_pass)(int mb, int bits, int K, int G, const float *xp, const float *x, const uint32_t *w,
                               const float *scales, const float *biases, float *out, int ldo, int n0, int n1) {
    const int NG = 32 / bits * LANES / G; /* groups per block; 0 when a group spans several blocks */
    if (bits == 8) {
        if (NG <= 1) { QUANTIZED_MB(mb, 2, 8, 1) }
        else if (NG == 2) { QUANTIZED_MB(mb, 2, 8, 2) }
        else { QUANTIZED_MB(mb, 2, 8, 4) }
    } else {
        if (NG <= 1) { QUANTIZED_MB(mb, 2, 4, 1) }
        else if (NG == 2) { QUANTIZED_MB(mb, 2, 4, 2) }
        else { QUANTIZED_MB(mb, 2, 4, 4) }
    }
}

#undef QUANTIZED_MB

/* Columns [n0, n1) of out (M x N, row stride ldo) for M <= 16 rows; more rows than one pass holds are taken in
 * passes over a block of columns at a time, so the packed weights are read from memory once. */
static void FN(quantized_columns)(int M, int bits, int K, int G, const float *xp, const float *x, const uint32_t *w,
                                  const float *scales, const float *biases, float *out, int ldo, int n0, int n1) {
    const int block = M <= MAX_MB ? n1 - n0 : QCOLUMN_BLOCK;
    for (int b0 = n0; b0 < n1; b0 += block) {
        int b1 = n1 - b0 < block ? n1 : b0 + block;
        for (int m0 = 0; m0 < M; m0 += MAX_MB) {
            int mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
            FN(quantized_pass)(mb, bits, K, G, xp + (size_t)m0 * K, x + (size_t)m0 * K, w, scales, biases,
                               out + (size_t)m0 * ldo, ldo, b0, b1);
        }
    }
}

#undef QCOLUMN_BLOCK
#undef vf
#undef vi
#undef vu
#undef FN
#undef CAT
#undef CAT_
