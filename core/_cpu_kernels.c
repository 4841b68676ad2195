/*
 * CPU kernels for the products and attention a decoder step makes, loaded by core/blas.py on Linux.
 *
 * 1. A CBLAS `cblas_sgemm` in front of the real BLAS. MLX's CPU backend multiplies every float32 matrix through
 *    `cblas_sgemm`. A MusicGen decoder step multiplies a few rows (2 per prompt with guidance) by every weight
 *    matrix. General BLAS kernels pack their operands for large blocks: for a few rows that copies the weights on
 *    every call, and for tiny products the threading and dispatch cost more than the arithmetic. Measured on a
 *    2-core x86-64 VM (bench/README figures): all of a musicgen-small step's weight products at 8 rows took
 *    93-144 ms in MKL, BLIS and OpenBLAS (70 ms here), against ~43 ms to stream the weights once.
 *    This library is loaded globally before MLX, so MLX's `cblas_sgemm` resolves here:
 *      - few rows (M <= SKINNY_MAX_ROWS) times a large matrix: the weights are streamed once, each element
 *        multiplied with every row in registers; the output columns are split between a small pool of threads;
 *      - small ones are computed on the calling thread, without waking any;
 *      - everything else goes to the real BLAS (`skinny_set_fallback`), unchanged.
 *    Sums are float32 with 16 partial sums per dot product (a different order than the BLAS, not less accurate).
 *
 * 2. `decode_attention`: one decoding step of self-attention for every (row, head) at once, against a key/value
 *    cache in host memory, called by core/musicgen.py with ctypes. MLX on the CPU runs attention as two batched
 *    products (one `cblas_sgemm` call per row and head, thousands per step) and a softmax with a scalar `exp`;
 *    at 8 rows and 250 positions that was ~50 ms of a ~135 ms step, against ~14 ms to read the cache once.
 *    Here each (row, head) streams its keys and values once, with a vectorised `exp`, on the same threads.
 */

#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { RowMajor = 101 };
enum { NoTrans = 111, Trans = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

#define SKINNY_MAX_ROWS 8
#ifndef PREFETCH_FLOATS
#define PREFETCH_FLOATS 1024 /* 4 KB ahead in each weight row: measured +5% at 8 rows, neutral at 1-4 */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 3
#endif
#define THREAD_MIN_FLOATS (1 << 12) /* a matrix smaller than this (16 KB) is not worth waking threads for */
#define MAX_THREADS 64
#define SPIN_NS 2000000            /* a worker spins this long for the next product before it sleeps */

static sgemm_fn fallback;
static int n_threads = 1;

/* ------------------------------------------------------------------------------------------------ kernels */

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* unaligned 16-float vector */

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) {
    v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

static inline void store(float *c, float value, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * value : alpha * value + beta * *c;
}

/* C[m, n] = sum_k A[m, k] * B[n, k] for n in [n0, n1): A is M x K contiguous, B rows have stride ldb.
 * MB rows of A and R rows of B at a time; MB and R are constants in every instance, so the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void
dot_rows(int MB, int R, int K, const float *A, const float *B, int ldb, float *C, int ldc, int n0, int n1,
         float alpha, float beta) {
    const int K16 = K & ~15;
    int n = n0;
    for (; n + R <= n1; n += R) {
        v16 acc[SKINNY_MAX_ROWS][4] = {{{0}}};
        for (int k = 0; k < K16; k += 16) {
            v16 w[4];
            for (int r = 0; r < R; r++) {
                const float *b = B + (size_t)(n + r) * ldb + k;
                __builtin_prefetch(b + PREFETCH_FLOATS, 0, PREFETCH_LOCALITY);
                w[r] = *(const v16 *)b;
            }
            for (int m = 0; m < MB; m++) {
                v16 a = *(const v16 *)(A + (size_t)m * K + k);
                for (int r = 0; r < R; r++) acc[m][r] += a * w[r];
            }
        }
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) {
                float s = hsum(acc[m][r]);
                for (int k = K16; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)(n + r) * ldb + k];
                store(C + (size_t)m * ldc + n + r, s, alpha, beta);
            }
    }
    for (; n < n1; n++) /* fewer than R columns left */
        for (int m = 0; m < MB; m++) {
            v16 acc = {0};
            for (int k = 0; k < K16; k += 16)
                acc += *(const v16 *)(A + (size_t)m * K + k) * *(const v16 *)(B + (size_t)n * ldb + k);
            float s = hsum(acc);
            for (int k = K16; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)n * ldb + k];
            store(C + (size_t)m * ldc + n, s, alpha, beta);
        }
}

/* C[m, n] = sum_k A[m, k] * B[k, n] for n in [n0, n1): B is K x N with row stride ldb (rows of B are axpy'd). */
static inline __attribute__((always_inline)) void
axpy_rows(int MB, int K, const float *A, const float *B, int ldb, float *C, int ldc, int n0, int n1, float alpha,
          float beta) {
    int n = n0;
    for (; n + 64 <= n1; n += 64) {
        v16 acc[4][4] = {{{0}}};
        for (int k = 0; k < K; k++) {
            const float *b = B + (size_t)k * ldb + n;
            v16 w0 = *(const v16 *)b, w1 = *(const v16 *)(b + 16), w2 = *(const v16 *)(b + 32),
                w3 = *(const v16 *)(b + 48);
            for (int m = 0; m < MB; m++) {
                float a = A[(size_t)m * K + k];
                acc[m][0] += a * w0; acc[m][1] += a * w1; acc[m][2] += a * w2; acc[m][3] += a * w3;
            }
        }
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 64; j++) store(C + (size_t)m * ldc + n + j, acc[m][j / 16][j % 16], alpha, beta);
    }
    for (; n + 16 <= n1; n += 16) {
        v16 acc[4] = {{0}};
        for (int k = 0; k < K; k++) {
            v16 w = *(const v16 *)(B + (size_t)k * ldb + n);
            for (int m = 0; m < MB; m++) acc[m] += A[(size_t)m * K + k] * w;
        }
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 16; j++) store(C + (size_t)m * ldc + n + j, acc[m][j], alpha, beta);
    }
    for (; n < n1; n++)
        for (int m = 0; m < MB; m++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)m * K + k] * B[(size_t)k * ldb + n];
            store(C + (size_t)m * ldc + n, s, alpha, beta);
        }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Columns [n0, n1) of C = alpha * A B(^T) + beta * C, for M <= SKINNY_MAX_ROWS rows of contiguous A. */
CLONES static void skinny_columns(int transB, int M, int K, const float *A, const float *B, int ldb, float *C,
                                  int ldc, int n0, int n1, float alpha, float beta) {
    if (transB) {
        /* as many B rows at a time as keep MB x R accumulators in 32 vector registers */
        for (int m0 = 0; m0 < M; m0 += 8) {
            int mb = M - m0 < 8 ? M - m0 : 8;
            const float *a = A + (size_t)m0 * K;
            float *c = C + (size_t)m0 * ldc;
            switch (mb) {
            case 1: dot_rows(1, 4, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 2: dot_rows(2, 4, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 3: dot_rows(3, 4, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 4: dot_rows(4, 4, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 5: dot_rows(5, 3, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 6: dot_rows(6, 3, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 7: dot_rows(7, 2, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            default: dot_rows(8, 3, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            }
        }
    } else {
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mb = M - m0 < 4 ? M - m0 : 4;
            const float *a = A + (size_t)m0 * K;
            float *c = C + (size_t)m0 * ldc;
            switch (mb) {
            case 1: axpy_rows(1, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 2: axpy_rows(2, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            case 3: axpy_rows(3, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            default: axpy_rows(4, K, a, B, ldb, c, ldc, n0, n1, alpha, beta); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ threads */

/* One parallel job at a time: parts 0 .. parts-1 of `task`, part 0 on the calling thread. */
typedef void (*task_fn)(const void *args, int part, int parts);

static task_fn job_task;
static const void *job_args;
static int job_parts;
static atomic_ulong job_seq;
static atomic_int job_remaining;
static atomic_int sleepers;
static atomic_flag pool_busy = ATOMIC_FLAG_INIT;
static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cond = PTHREAD_COND_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_size;              /* workers started, besides the calling thread */
static unsigned long pool_start_seq; /* job_seq when they were started: the first job they wait for is the next */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *worker(void *arg) {
    int part = (int)(intptr_t)arg;
    unsigned long seen = pool_start_seq;
    for (;;) {
        uint64_t start = now_ns();
        unsigned spins = 0;
        while (atomic_load(&job_seq) == seen) {
            cpu_relax();
            if ((++spins & 255) == 0) sched_yield();
            if ((spins & 255) == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&pool_mutex);
                atomic_fetch_add(&sleepers, 1);
                while (atomic_load(&job_seq) == seen) pthread_cond_wait(&pool_cond, &pool_mutex);
                atomic_fetch_sub(&sleepers, 1);
                pthread_mutex_unlock(&pool_mutex);
            }
        }
        seen = atomic_load(&job_seq);
        if (part < job_parts) job_task(job_args, part, job_parts);
        atomic_fetch_sub(&job_remaining, 1);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has none of the parent's workers: start again (and unlock whatever the fork caught locked) */
    pool_once = (pthread_once_t)PTHREAD_ONCE_INIT;
    pool_size = 0;
    atomic_flag_clear(&pool_busy);
    pthread_mutex_init(&pool_mutex, NULL);
    pthread_cond_init(&pool_cond, NULL);
    atomic_store(&sleepers, 0);
}

static void start_pool(void) {
    pthread_atfork(NULL, NULL, reset_after_fork);
    pool_start_seq = atomic_load(&job_seq);
    for (int i = 1; i < n_threads; i++) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)i);
        pthread_attr_destroy(&attr);
        if (failed) break; /* run with the workers there are */
        pool_size = i;
    }
}

/* Run `task` in up to `parts` parts on the pool; on the calling thread alone if another caller holds the pool. */
static void run_parallel(task_fn task, const void *args, int parts) {
    if (parts <= 1 || atomic_flag_test_and_set(&pool_busy)) {
        for (int part = 0; part < parts; part++) task(args, part, parts);
        return;
    }
    pthread_once(&pool_once, start_pool);
    int workers = parts - 1 < pool_size ? parts - 1 : pool_size;
    job_task = task, job_args = args, job_parts = workers + 1;
    atomic_store(&job_remaining, pool_size);
    atomic_fetch_add(&job_seq, 1);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&pool_mutex);
        pthread_cond_broadcast(&pool_cond);
        pthread_mutex_unlock(&pool_mutex);
    }
    task(args, 0, job_parts);
    for (unsigned spins = 0; atomic_load(&job_remaining) > 0;)
        if ((++spins & 255) == 0) sched_yield(); else cpu_relax();
    atomic_flag_clear(&pool_busy);
}

/* ------------------------------------------------------------------------------------------------ attention */

#define ATTENTION_MAX_HEAD 256 /* head sizes up to this (MusicGen's are 64) */
#define ATTENTION_STACK_POSITIONS 4096

typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

/* exp(x) of 16 floats: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), e^r by a degree-7 polynomial
 * (Cephes expf, relative error ~2e-7), 2^n put in the exponent bits; 0 below -87.3, where float32 exp underflows.
 * Only ever called with x <= 0 (scores minus their maximum), so nothing overflows. */
static inline v16 exp16(v16 x) {
    v16i under = x < -87.3f;
    x = (v16)((v16i)x & ~under);                      /* 0 there, masked out of the result below */
    v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2), in float */
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = (v16){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v16 two_n = (v16)((__builtin_convertvector(n, v16i) + 127) << 23);
    return (v16)((v16i)(p * two_n) & ~under);
}

typedef struct {
    int BH, L, D;                  /* (row, head) pairs; positions with this step's; head size */
    float scale;
    const float *q, *k_new, *v_new; /* (BH, D) each: this step's query, key and value */
    float *k_cache, *v_cache;       /* (BH, capacity, D): this step's key and value go to position L - 1 */
    long capacity;
    float *out;                    /* (BH, D) */
} attention_t;

/* softmax(q kᵀ · scale) v over positions 0 .. L-1 of one (row, head); D a constant in the hot instance. */
static inline __attribute__((always_inline)) void
attend(int D, int L, float scale, const float *q, const float *k, const float *v, float *scores, float *out) {
    const int D16 = D / 16;
    v16 qv[ATTENTION_MAX_HEAD / 16];
    for (int c = 0; c < D16; c++) qv[c] = *(const v16 *)(q + 16 * c) * scale;
    float best = -__builtin_inff();
    for (int t = 0; t < L; t++) {
        const float *kt = k + (size_t)t * D;
        v16 acc = {0};
        for (int c = 0; c < D16; c++) acc += qv[c] * *(const v16 *)(kt + 16 * c);
        float x = hsum(acc);
        for (int d = 16 * D16; d < D; d++) x += q[d] * scale * kt[d];
        scores[t] = x;
        best = x > best ? x : best;
    }
    int padded = (L + 15) & ~15;
    for (int t = L; t < padded; t++) scores[t] = -__builtin_inff();
    v16 total = {0};
    for (int t = 0; t < padded; t += 16) {
        v16 e = exp16(*(v16 *)(scores + t) - best);
        *(v16 *)(scores + t) = e;
        total += e;
    }
    float inv = 1.0f / hsum(total);
    v16 o[ATTENTION_MAX_HEAD / 16];
    float tail[16] = {0};
    for (int c = 0; c < D16; c++) o[c] = (v16){0};
    for (int t = 0; t < L; t++) {
        const float *vt = v + (size_t)t * D;
        float w = scores[t];
        for (int c = 0; c < D16; c++) o[c] += w * *(const v16 *)(vt + 16 * c);
        for (int d = 16 * D16; d < D; d++) tail[d - 16 * D16] += w * vt[d];
    }
    for (int c = 0; c < D16; c++) *(v16 *)(out + 16 * c) = o[c] * inv;
    for (int d = 16 * D16; d < D; d++) out[d] = tail[d - 16 * D16] * inv;
}

CLONES static void attention_part(const void *args, int part, int parts) {
    const attention_t *a = args;
    int first = (int)((long)a->BH * part / parts), last = (int)((long)a->BH * (part + 1) / parts);
    float stack[ATTENTION_STACK_POSITIONS + 16];
    float *scores = a->L <= ATTENTION_STACK_POSITIONS ? stack : malloc(sizeof(float) * ((size_t)a->L + 16));
    if (!scores) abort(); /* nothing sensible to hand MLX without it */
    for (int bh = first; bh < last; bh++) {
        size_t row = (size_t)bh * a->D;
        float *k = a->k_cache + (size_t)bh * a->capacity * a->D, *v = a->v_cache + (size_t)bh * a->capacity * a->D;
        for (int d = 0; d < a->D; d++) {
            k[(size_t)(a->L - 1) * a->D + d] = a->k_new[row + d];
            v[(size_t)(a->L - 1) * a->D + d] = a->v_new[row + d];
        }
        if (a->D == 64)
            attend(64, a->L, a->scale, a->q + row, k, v, scores, a->out + row);
        else
            attend(a->D, a->L, a->scale, a->q + row, k, v, scores, a->out + row);
    }
    if (scores != stack) free(scores);
}

/* One decoding step of attention for BH (row, head) pairs: writes this step's keys and values into the cache at
 * position L - 1, then out = softmax(q kᵀ · scale) v over positions 0 .. L-1. Arrays are C-contiguous float32.
 * Returns 0, or -1 (computing nothing) for a head size over ATTENTION_MAX_HEAD or L outside 1 .. capacity. */
int decode_attention(int BH, int L, int D, float scale, const float *q, const float *k_new, const float *v_new,
                     float *k_cache, float *v_cache, long capacity, float *out) {
    if (D < 1 || D > ATTENTION_MAX_HEAD || L < 1 || L > capacity || BH < 1) return -1;
    attention_t a = {BH, L, D, scale, q, k_new, v_new, k_cache, v_cache, capacity, out};
    long floats = (long)BH * L * D * 2;
    run_parallel(attention_part, &a, n_threads > 1 && floats >= THREAD_MIN_FLOATS ? (BH < n_threads ? BH : n_threads) : 1);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ entry */

static void call_fallback(int order, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (!fallback) fallback = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (!fallback) { /* computing nothing would hand MLX garbage: stop loudly instead */
        fprintf(stderr, "_cpu_kernels: no BLAS to hand products to (skinny_set_fallback was not called)\n");
        abort();
    }
    fallback(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

typedef struct {
    int transB, M, N, K, ldb, ldc, grain;
    const float *A, *B;
    float *C;
    float alpha, beta;
} product_t;

static void product_part(const void *args, int part, int parts) {
    /* contiguous column ranges, each a multiple of the grain so the kernels see whole blocks */
    const product_t *p = args;
    int blocks = (p->N + p->grain - 1) / p->grain;
    int b0 = (int)((long)blocks * part / parts), b1 = (int)((long)blocks * (part + 1) / parts);
    int n0 = b0 * p->grain, n1 = b1 * p->grain < p->N ? b1 * p->grain : p->N;
    if (n0 < n1) skinny_columns(p->transB, p->M, p->K, p->A, p->B, p->ldb, p->C, p->ldc, n0, n1, p->alpha, p->beta);
}

/* C = alpha * op(A) op(B) + beta * C, row-major, with M <= SKINNY_MAX_ROWS. A is packed contiguous first. */
static void skinny(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    float stack[4096];
    float *packed = NULL;
    const float *a = A;
    if (transA || lda != K) {
        packed = (size_t)M * K <= 4096 ? stack : malloc(sizeof(float) * (size_t)M * K);
        if (!packed) {
            call_fallback(RowMajor, transA ? Trans : NoTrans, transB ? Trans : NoTrans, M, N, K, alpha,
                          A, lda, B, ldb, beta, C, ldc);
            return;
        }
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) packed[(size_t)m * K + k] = transA ? A[(size_t)k * lda + m] : A[(size_t)m * lda + k];
        a = packed;
    }
    if (n_threads > 1 && (long)N * K >= THREAD_MIN_FLOATS) {
        /* columns are split in blocks the kernels take whole: 4 rows of B^T, or 16-64 columns of B (narrow
           products, like attention's probabilities times values, split in 16s so that every thread gets some) */
        product_t product = {transB, M, N, K, ldb, ldc, transB ? 4 : (N < 256 ? 16 : 64), a, B, C, alpha, beta};
        run_parallel(product_part, &product, n_threads);
    } else {
        skinny_columns(transB, M, K, a, B, ldb, C, ldc, 0, N, alpha, beta);
    }
    if (packed && packed != stack) free(packed);
}

void cblas_sgemm(int order, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (order != RowMajor || M < 1 || N < 1 || K < 1 || M > SKINNY_MAX_ROWS) {
        call_fallback(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    skinny(transA != NoTrans, transB != NoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ------------------------------------------------------------------------------------------------ control */

void skinny_set_fallback(void *fn) { fallback = (sgemm_fn)fn; }
void skinny_set_threads(int threads) {
    n_threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}
int skinny_max_rows(void) { return SKINNY_MAX_ROWS; }

/* An importable module, so that setuptools builds this file like any extension; core/blas.py loads it with
 * ctypes (globally, before MLX) and never imports it. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                    "CPU kernels: few-row cblas_sgemm, decode attention (loaded by core.blas)", -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
