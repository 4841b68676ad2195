/*
 * A CBLAS `cblas_sgemm` for the products a decoder step makes on the CPU, in front of the real BLAS.
 *
 * MLX's CPU backend multiplies every float32 matrix through `cblas_sgemm`. A MusicGen decoder step multiplies a
 * few rows (2 per prompt with guidance) by every weight matrix, and its attention makes thousands of tiny
 * per-head products. General BLAS kernels pack their operands for large blocks: for a few rows that copies the
 * weights on every call, and for tiny products the threading and dispatch cost more than the arithmetic.
 * Measured on a 2-core x86-64 VM (bench/README figures): all of a musicgen-small step's weight products at 8 rows
 * took 93-144 ms in MKL, BLIS and OpenBLAS (70 ms here), against ~43 ms to stream the weights once.
 *
 * This library is loaded globally before MLX (core/blas.py), so MLX's `cblas_sgemm` resolves here:
 *   - few rows (M <= SKINNY_MAX_ROWS) times a large matrix: the weights are streamed once, each element
 *     multiplied with every row in registers; the output columns are split between a small pool of threads;
 *   - small ones (attention heads) are computed on the calling thread, without waking any;
 *   - everything else goes to the real BLAS (`skinny_set_fallback`), unchanged.
 * Sums are float32 with 16 partial sums per dot product (a different order than the BLAS, not less accurate).
 */

#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
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
#define PREFETCH_FLOATS 1024 /* 4 KB ahead in each weight row: measured +5% at 8 rows, neutral at 1-4 */
#define THREAD_MIN_FLOATS (1 << 12) /* a matrix smaller than this (16 KB) is not worth waking threads for */
#define MAX_THREADS 64
#define SPIN_NS 200000             /* a worker spins this long for the next product before it sleeps */

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
                __builtin_prefetch(b + PREFETCH_FLOATS);
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

typedef struct {
    int transB, M, N, K, ldb, ldc, parts, grain;
    const float *A, *B;
    float *C;
    float alpha, beta;
} job_t;

static job_t job;
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

static void run_part(int part) {
    /* contiguous column ranges, each a multiple of the grain so the kernels see whole blocks */
    int blocks = (job.N + job.grain - 1) / job.grain;
    int b0 = (int)((long)blocks * part / job.parts), b1 = (int)((long)blocks * (part + 1) / job.parts);
    int n0 = b0 * job.grain, n1 = b1 * job.grain < job.N ? b1 * job.grain : job.N;
    if (n0 < n1) skinny_columns(job.transB, job.M, job.K, job.A, job.B, job.ldb, job.C, job.ldc, n0, n1, job.alpha,
                                job.beta);
}

static void *worker(void *arg) {
    int part = (int)(intptr_t)arg;
    unsigned long seen = pool_start_seq;
    for (;;) {
        uint64_t start = now_ns();
        unsigned spins = 0;
        while (atomic_load(&job_seq) == seen) {
            cpu_relax();
            if ((++spins & 255) == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&pool_mutex);
                atomic_fetch_add(&sleepers, 1);
                while (atomic_load(&job_seq) == seen) pthread_cond_wait(&pool_cond, &pool_mutex);
                atomic_fetch_sub(&sleepers, 1);
                pthread_mutex_unlock(&pool_mutex);
            }
        }
        seen = atomic_load(&job_seq);
        if (part < job.parts) run_part(part);
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

static void run_job(void) {
    pthread_once(&pool_once, start_pool);
    int workers = job.parts - 1 < pool_size ? job.parts - 1 : pool_size;
    job.parts = workers + 1;
    atomic_store(&job_remaining, pool_size);
    atomic_fetch_add(&job_seq, 1);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&pool_mutex);
        pthread_cond_broadcast(&pool_cond);
        pthread_mutex_unlock(&pool_mutex);
    }
    run_part(0);
    while (atomic_load(&job_remaining) > 0) cpu_relax();
}

/* ------------------------------------------------------------------------------------------------ entry */

static void call_fallback(int order, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (!fallback) fallback = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (!fallback) { /* computing nothing would hand MLX garbage: stop loudly instead */
        fprintf(stderr, "_skinny_gemm: no BLAS to hand products to (skinny_set_fallback was not called)\n");
        abort();
    }
    fallback(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
    if (n_threads > 1 && (long)N * K >= THREAD_MIN_FLOATS && !atomic_flag_test_and_set(&pool_busy)) {
        /* columns are split in blocks the kernels take whole: 4 rows of B^T, or 16-64 columns of B (narrow
           products, like attention's probabilities times values, split in 16s so that every thread gets some) */
        job = (job_t){transB, M, N, K, ldb, ldc, n_threads, transB ? 4 : (N < 256 ? 16 : 64), a, B, C, alpha, beta};
        run_job();
        atomic_flag_clear(&pool_busy);
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
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_skinny_gemm",
                                    "cblas_sgemm for few-row products (loaded by core.blas)", -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__skinny_gemm(void) { return PyModule_Create(&module); }
