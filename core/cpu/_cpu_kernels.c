/*
 * CPU kernels for the products and attention a decoder step makes, loaded by core/blas.py on Linux.
 *
 * 1. A CBLAS `cblas_sgemm` in front of the real BLAS. MLX's CPU backend multiplies every float32 matrix through
 *    `cblas_sgemm`. A MusicGen decoder step multiplies a few rows (2 per prompt with guidance) by every weight
 *    matrix. General BLAS kernels pack their operands for large blocks: for a few rows that copies the weights on
 *    every call, and for tiny products the threading and dispatch cost more than the arithmetic. Measured on a
 *    2-core x86-64 VM (bench/README figures): all of a musicgen-small step's weight products at 8 rows took
 *    93-144 ms in MKL, BLIS and OpenBLAS (63 ms here), at 16 rows 136 ms in OpenBLAS (102 ms here), against
 *    ~44 ms to stream the weights once.
 *    This library is loaded globally before MLX, so MLX's `cblas_sgemm` resolves here:
 *      - few rows (M <= SKINNY_MAX_ROWS) times a large matrix: the weights are streamed once, each element
 *        multiplied with every row in registers (more rows than the registers hold in passes over blocks of
 *        columns that stay in cache); the output columns are split between a small pool of threads;
 *      - small ones are computed on the calling thread, without waking any;
 *      - everything else goes to the real BLAS (`skinny_set_fallback`), unchanged.
 *    Sums are float32 with one partial sum per vector lane (16, 8 or 4) per dot product: a different order than
 *    the BLAS, not less accurate, and the same for a row whatever the rows around it.
 *
 * 2. `decode_attention` and `cross_attention`: one decoding step of self-attention for every (row, head) at once,
 *    against a key/value cache in host memory, and of cross-attention over the text, called by core/musicgen.py
 *    with ctypes. MLX on the CPU runs attention as two batched
 *    products (one `cblas_sgemm` call per row and head, thousands per step) and a softmax with a scalar `exp`;
 *    at 8 rows and 250 positions that was ~50 ms of a ~135 ms step, against ~14 ms to read the cache once.
 *    Here each (row, head) streams its keys and values once, with a vectorised `exp`, on the same threads.
 */

#define _GNU_SOURCE
#include <Python.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { RowMajor = 101 };
enum { NoTrans = 111, Trans = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

#define SKINNY_MAX_ROWS 16
#define PREFETCH_FLOATS 1024 /* 4 KB ahead in each weight row: measured +5% at 8 rows, neutral at 1-4 */
#define THREAD_MIN_FLOATS (1 << 12) /* a matrix smaller than this (16 KB) is not worth waking threads for */
#define MAX_THREADS 64
#define SPIN_NS 2000000            /* a worker spins this long for the next product before it sleeps */

/* What Python checks at load (core/cpu/blas.py KERNEL_ABI): bump it whenever a signature or meaning changes. */
#define KERNEL_ABI 8

static sgemm_fn fallback;
static int n_threads = 1;

/* Counters Python reads (kernel_counters) to prove the products and the attention went through here, and an error
 * flag for what cblas_sgemm (void) cannot return: Python raises on it (kernel_take_error) after each call/step. */
static atomic_ulong count_skinny, count_fallback, count_attention, count_quantized;
static atomic_int kernel_error;

/* ------------------------------------------------------------------------------------------------ kernels */

#define QUANT_MAX_MATRICES 8 /* q, k and v; the 4 (or 8) heads of logits */
#define ATTENTION_MAX_HEAD 256 /* head sizes up to this (MusicGen's are 64) */
#define ATTENTION_STACK_POSITIONS 4096
#define ATTENTION_PREFETCH 8 /* positions ahead in the keys and values: 8 rows' self-attention 20 % faster */

static inline void store(float *c, float value, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * value : alpha * value + beta * *c;
}

typedef struct {
    int BH, L, D, heads;            /* (row, head) pairs; positions attended; head size; heads per row */
    float scale;
    const float *q, *k_new, *v_new; /* (BH, D) each: this step's query, and key and value (or NULL) */
    void *k_cache, *v_cache;        /* (BH, capacity, D); k_new and v_new are written at position L - 1 */
    long capacity;
    int half;                       /* the caches hold float16 (decode_attention_f16), else float32 */
    const uint8_t *mask;            /* (BH / heads, capacity): 0 where a row does not attend, or NULL */
    float *out;                     /* (BH, D) */
} attention_t;

typedef void (*columns_fn)(int transB, int M, int K, const float *A, const float *B, int ldb, float *C, int ldc,
                           int n0, int n1, float alpha, float beta);
typedef void (*attention_rows_fn)(const attention_t *a, int first, int last, float *scores);
typedef void (*quant_fn)(int bits, int G, int M, int K, const float *A, const uint8_t *W, const float *S,
                         const float *Bi, float *C, int ldc, int n0, int n1);
typedef void (*permute_fn)(int M, int K, const float *A, float *out);
typedef void (*inplace_fn)(long n, float *x);
typedef void (*layer_norm_fn)(int M, int K, const float *x, const float *weight, const float *bias, float eps,
                              float *out);
struct packed_s;
typedef void (*packed_fn)(const struct packed_s *p, int j, int nb, int m0, int mb);
typedef void (*quantize8_fn)(int M, int K, int G, const float *A, int8_t *ia, int ldi, float *sa, float *asum);

/* One instruction set's quantized product: the kernel and the 4-bit de-interleaving of A it expects, chosen
 * together so a product never mixes two sets. */
typedef struct {
    quant_fn columns;
    permute_fn permute;
    inplace_fn gelu;
    inplace_fn elu;
    layer_norm_fn layer_norm;
    packed_fn packed;        /* one block of 16 columns of the int8-activation product (quantized_matmul_packed) */
    quantize8_fn quantize8;  /* its rows of activations to int8 */
    int packed_fast;         /* 2: packed is the VNNI one, 1: the AVX2 one, 0: portable C (correct, not faster) */
} quant_kernel_t;

/* The kernels once per vector width (core/cpu/_cpu_kernels_simd.h), each compiled for its instruction set: the
 * registers decide the blocking, so one 16-wide source compiled for AVX2 would spill (measured 7x slower). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define LANES 16
#define MAX_MB 8
#define SUFFIX _avx512
#include "_cpu_kernels_simd.h"
#undef LANES
#undef MAX_MB
#undef SUFFIX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define LANES 8
#define MAX_MB 4
#define SUFFIX _avx2
#include "_cpu_kernels_simd.h"
#undef LANES
#undef MAX_MB
#undef SUFFIX
#pragma GCC pop_options
#endif

#include "_cpu_kernels_int8.h"

#define LANES 4 /* SSE2 or NEON */
#define MAX_MB 4
#define SUFFIX _base
#include "_cpu_kernels_simd.h"
#undef LANES
#undef MAX_MB
#undef SUFFIX

static _Atomic(columns_fn) skinny_columns = skinny_columns_base;
static _Atomic(attention_rows_fn) attention_rows = attention_rows_base;
static _Atomic(const char *) instruction_set = "baseline";
static const quant_kernel_t quant_base = {quant_columns_base, quant_permute_base, gelu_inplace_base,
                                          elu_inplace_base, layer_norm_rows_base, packed_block_portable,
                                          quantize_rows_int8, 0};
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
static const quant_kernel_t quant_avx512 = {quant_columns_avx512, quant_permute_avx512, gelu_inplace_avx512,
                                            elu_inplace_avx512, layer_norm_rows_avx512, packed_block_avx2,
                                            quantize_rows_int8_avx2, 1};
static const quant_kernel_t quant_avx512_vnni = {quant_columns_avx512, quant_permute_avx512, gelu_inplace_avx512,
                                                 elu_inplace_avx512, layer_norm_rows_avx512, packed_block_vnni,
                                                 quantize_rows_int8_avx512, 2};
static const quant_kernel_t quant_avx2 = {quant_columns_avx2, quant_permute_avx2, gelu_inplace_avx2,
                                          elu_inplace_avx2, layer_norm_rows_avx2, packed_block_avx2,
                                          quantize_rows_int8_avx2, 1};
#endif
static _Atomic(const quant_kernel_t *) quant_kernel = &quant_base;
static atomic_flag pool_busy = ATOMIC_FLAG_INIT; /* held by the one parallel job in flight (and kernel_select) */

/* Use the kernels of one instruction set ("avx512", "avx2", "baseline", or NULL for the widest this CPU has);
 * returns 0, or -1 (changing nothing) if the CPU lacks it. Tests run every set the CPU has. */
static int select_kernels(const char *name) {
    int any = name == NULL;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if ((any || !strcmp(name, "avx512")) && avx512) {
        skinny_columns = skinny_columns_avx512; attention_rows = attention_rows_avx512; instruction_set = "avx512";
        quant_kernel = __builtin_cpu_supports("avx512vnni") ? &quant_avx512_vnni : &quant_avx512;
        return 0;
    }
    if ((any || !strcmp(name, "avx2")) && avx2) {
        skinny_columns = skinny_columns_avx2; attention_rows = attention_rows_avx2; instruction_set = "avx2";
        quant_kernel = &quant_avx2;
        return 0;
    }
#endif
    if (any || !strcmp(name, "baseline")) {
        skinny_columns = skinny_columns_base; attention_rows = attention_rows_base; instruction_set = "baseline";
        quant_kernel = &quant_base;
        return 0;
    }
    return -1;
}

static inline void cpu_relax(void);

/* Swaps the kernels only while no parallel job is in flight (it takes the pool as a job would), so the workers of
 * one product never mix two instruction sets; a caller computing inline sees either set whole (atomic pointers). */
int kernel_select(const char *name) {
    while (atomic_flag_test_and_set(&pool_busy)) cpu_relax();
    int status = select_kernels(name);
    atomic_flag_clear(&pool_busy);
    return status;
}

__attribute__((constructor)) static void choose_kernels(void) { select_kernels(NULL); }

/* ------------------------------------------------------------------------------------------------ threads */

/* One parallel job at a time: parts 0 .. parts-1 of `task`, part 0 on the calling thread. */
typedef void (*task_fn)(const void *args, int part, int parts);

static task_fn job_task;
static const void *job_args;
static int job_parts;
static atomic_ulong job_seq;
static atomic_int job_remaining;
static atomic_int sleepers;
static atomic_int spin_allowed;     /* > 0 while a generation runs (kernel_begin/kernel_end): workers spin */
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
            /* outside a generation a worker sleeps at once: it must not spin beside the bot's event loop */
            if ((spins & 255) == 0 && (atomic_load(&spin_allowed) <= 0 || now_ns() - start > SPIN_NS)) {
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

static void attention_part(const void *args, int part, int parts) {
    const attention_t *a = args;
    int first = (int)((long)a->BH * part / parts), last = (int)((long)a->BH * (part + 1) / parts);
    float stack[ATTENTION_STACK_POSITIONS + 16];
    float *scores = a->L <= ATTENTION_STACK_POSITIONS ? stack : malloc(sizeof(float) * ((size_t)a->L + 16));
    if (!scores) { /* the caller returns an error Python raises */
        atomic_store(&kernel_error, 1);
        return;
    }
    attention_rows(a, first, last, scores);
    if (scores != stack) free(scores);
}

static int run_attention(const attention_t *a) {
    atomic_fetch_add_explicit(&count_attention, 1, memory_order_relaxed);
    long floats = (long)a->BH * a->L * a->D * 2;
    run_parallel(attention_part, a, n_threads > 1 && floats >= THREAD_MIN_FLOATS ? (a->BH < n_threads ? a->BH : n_threads) : 1);
    return atomic_exchange(&kernel_error, 0) ? -2 : 0;
}

/* One decoding step of self-attention for BH (row, head) pairs: writes this step's keys and values into the cache
 * at position L - 1, then out = softmax(q kᵀ · scale) v over positions 0 .. L-1. Arrays are C-contiguous float32.
 * Returns 0, -1 (computing nothing) for a head size over ATTENTION_MAX_HEAD or L outside 1 .. capacity, or -2
 * when memory ran out. */
int decode_attention(int BH, int L, int D, float scale, const float *q, const float *k_new, const float *v_new,
                     float *k_cache, float *v_cache, long capacity, float *out) {
    if (D < 1 || D > ATTENTION_MAX_HEAD || L < 1 || L > capacity || BH < 1) return -1;
    attention_t a = {BH, L, D, 1, scale, q, k_new, v_new, k_cache, v_cache, capacity, 0, NULL, out};
    return run_attention(&a);
}

/* decode_attention over float16 caches (IEEE half, as NumPy's float16): this step's float32 keys and values are
 * rounded to nearest when written, every score and sum is float32. Half the bytes per position: at 8 rows the
 * attention reads the caches at the memory's speed, so it takes about half the time. */
int decode_attention_f16(int BH, int L, int D, float scale, const float *q, const float *k_new, const float *v_new,
                         uint16_t *k_cache, uint16_t *v_cache, long capacity, float *out) {
    if (D < 1 || D > ATTENTION_MAX_HEAD || L < 1 || L > capacity || BH < 1) return -1;
    attention_t a = {BH, L, D, 1, scale, q, k_new, v_new, k_cache, v_cache, capacity, 1, NULL, out};
    return run_attention(&a);
}

/* One query position of cross-attention for B rows of H heads over S keys and values (B * H, S, D), where
 * mask (B, S) is nonzero (NULL: everywhere). A row that attends nowhere attends everywhere uniformly, as an
 * additive mask does. Returns 0, -1 (computing nothing) for a head size over ATTENTION_MAX_HEAD, or -2 when memory
 * ran out. */
int cross_attention(int B, int H, int S, int D, float scale, const float *q, const float *k, const float *v,
                    const uint8_t *mask, float *out) {
    if (D < 1 || D > ATTENTION_MAX_HEAD || S < 1 || B < 1 || H < 1) return -1;
    attention_t a = {B * H, S, D, H, scale, q, NULL, NULL, (float *)k, (float *)v, S, 0, mask, out};
    return run_attention(&a);
}


/* ------------------------------------------------------------------------------------------------ quantized */

#define QUANT_GRAIN 16       /* columns per block a thread takes: a multiple of every kernel's 1, 2 or 4 at a time */

typedef struct {
    const quant_kernel_t *kernel;
    int bits, G, M, K, count, ldc;
    int first[QUANT_MAX_MATRICES + 1]; /* matrix j has output columns first[j] .. first[j + 1] - 1 */
    const float *A;
    const uint8_t *const *W;
    const float *const *S, *const *B;
    float *C;
} quantized_t;

static void quantized_part(const void *args, int part, int parts) {
    const quantized_t *q = args;
    int blocks = (q->ldc + QUANT_GRAIN - 1) / QUANT_GRAIN;
    int b0 = (int)((long)blocks * part / parts), b1 = (int)((long)blocks * (part + 1) / parts);
    int n0 = b0 * QUANT_GRAIN, n1 = b1 * QUANT_GRAIN < q->ldc ? b1 * QUANT_GRAIN : q->ldc;
    for (int j = 0; j < q->count; j++) { /* this part's columns of each matrix */
        int lo = n0 > q->first[j] ? n0 : q->first[j], hi = n1 < q->first[j + 1] ? n1 : q->first[j + 1];
        if (lo < hi)
            q->kernel->columns(q->bits, q->G, q->M, q->K, q->A, q->W[j], q->S[j], q->B[j], q->C + q->first[j],
                               q->ldc, lo - q->first[j], hi - q->first[j]);
    }
}

/* C = A · [W_0; W_1; …]ᵀ: A (M, K) times `count` matrices W_j (N_j, K) quantized by mx.quantize (affine, `bits` 4
 * or 8, group size `group`), whose outputs sit side by side in C (M, N_0 + N_1 + …): W_packed[j] (N_j, K * bits /
 * 32) uint32, scales[j] and biases[j] (N_j, K / group) float32, every array C-contiguous. One call for several
 * projections of one input (q, k and v; the heads of logits) saves crossings from Python. For M <=
 * SKINNY_MAX_ROWS rows, the few a decoder step has. Returns 0, -1 (computing nothing) for arguments it does not
 * take (bits, a group size that is not a multiple of 32 or does not divide K, too many rows or matrices), -2 when
 * memory ran out. */
int quantized_matmul(int M, int K, int bits, int group, int count, const int *N, const float *A,
                     const void *const *W_packed, const float *const *scales, const float *const *biases, float *C) {
    if (M < 1 || M > SKINNY_MAX_ROWS || K < 1 || (bits != 4 && bits != 8) || group < 32 || group % 32 ||
        K % group || count < 1 || count > QUANT_MAX_MATRICES)
        return -1;
    quantized_t q = {atomic_load(&quant_kernel), bits, group, M, K, count, 0, {0}, A, (const uint8_t *const *)W_packed,
                     scales, biases, C};
    for (int j = 0; j < count; j++) {
        if (N[j] < 1) return -1;
        q.first[j + 1] = q.first[j] + N[j];
    }
    q.ldc = q.first[count];
    atomic_fetch_add_explicit(&count_quantized, 1, memory_order_relaxed);
    float stack[4096];
    float *permuted = NULL;
    if (bits == 4) { /* de-interleaved for the kernel's vector width (quant_permute in _cpu_kernels_simd.h) */
        permuted = (size_t)M * K <= 4096 ? stack : malloc(sizeof(float) * (size_t)M * K);
        if (!permuted) return -2;
        q.kernel->permute(M, K, A, permuted);
        q.A = permuted;
    }
    int parts = n_threads > 1 && (long)q.ldc * K >= THREAD_MIN_FLOATS * 4 ? n_threads : 1;
    run_parallel(quantized_part, &q, parts);
    if (permuted && permuted != stack) free(permuted);
    return 0;
}

/* The exact (erf) GELU of n floats in place, for the host-memory decoder step. */
void gelu_inplace(long n, float *x) { atomic_load(&quant_kernel)->gelu(n, x); }

typedef struct {
    long n;
    float *x;
} elu_t;

static void elu_part(const void *args, int part, int parts) {
    const elu_t *e = args;
    long first = e->n * part / parts / 64 * 64, last = part + 1 == parts ? e->n : e->n * (part + 1) / parts / 64 * 64;
    atomic_load(&quant_kernel)->elu(last - first, e->x + first);
}

/* The ELU (alpha 1) of n floats in place, for EnCodec's decoder, on the kernels' threads. */
void elu_inplace(long n, float *x) {
    elu_t e = {n, x};
    run_parallel(elu_part, &e, n_threads > 1 && n >= THREAD_MIN_FLOATS * 16 ? n_threads : 1);
}

/* Layer norm of M rows of K floats into out (which may be x), for the host-memory decoder step. */
void layer_norm_rows(int M, int K, const float *x, const float *weight, const float *bias, float eps, float *out) {
    atomic_load(&quant_kernel)->layer_norm(M, K, x, weight, bias, eps, out);
}

/* ------------------------------------------------------------------------------------ int8 activations */

static void packed_part(const void *args, int part, int parts) {
    const packed_t *p = args;
    int blocks = p->ldc / PACK_COLUMNS;
    int b0 = (int)((long)blocks * part / parts), b1 = (int)((long)blocks * (part + 1) / parts);
    packed_fn block = p->kernel->packed;
    for (int b = b0, j = 0; b < b1; b++) {
        while (b * PACK_COLUMNS >= p->first[j + 1]) j++;
        int nb = b - p->first[j] / PACK_COLUMNS;
        for (int m0 = 0; m0 < p->M; m0 += PACK_MAX_MB)
            block(p, j, nb, m0, p->M - m0 < PACK_MAX_MB ? p->M - m0 : PACK_MAX_MB);
    }
}

/* C = A · [W_0; W_1; …]ᵀ for 8- or 4-bit weights in the packed layout of _cpu_kernels_int8.h (core.cpu.quantized
 * makes it from MLX's: W_j (N_j / 16, K · bits / 32, 16) uint32 words, S_j and B_j (N_j / 16, K / group, 16)
 * float32), with A's rows quantized to int8 per group of `group` values (scale max|a| / 127). Outputs side by side
 * in C (M, ΣN_j), as quantized_matmul. For M <= SKINNY_MAX_ROWS; every N_j a multiple of 16, `group` a multiple of
 * 32 / bits dividing K. Returns 0, -1 for arguments it does not take (computing nothing), -2 when memory ran out. */
int quantized_matmul_packed(int M, int K, int bits, int group, int count, const int *N, const float *A,
                            const void *const *W, const float *const *S, const float *const *B, float *C) {
    if (M < 1 || M > SKINNY_MAX_ROWS || K < 1 || (bits != 8 && bits != 4) || group < 32 / bits ||
        group % (32 / bits) || K % group || count < 1 || count > QUANT_MAX_MATRICES)
        return -1;
    packed_t p = {atomic_load(&quant_kernel), M, K, bits, group, count, 0, K, {0}, NULL, NULL, NULL,
                  (const uint8_t *const *)W, S, B, C};
    for (int j = 0; j < count; j++) {
        if (N[j] < 1 || N[j] % PACK_COLUMNS) return -1;
        p.first[j + 1] = p.first[j] + N[j];
    }
    p.ldc = p.first[count];
    int groups = K / group;
    /* kept between calls (per calling thread): ~150 calls a step */
    static __thread void *scratch;
    static __thread size_t scratch_size;
    size_t need = (size_t)M * p.ldi + 2 * sizeof(float) * (size_t)M * groups;
    if (need > scratch_size) {
        void *grown = realloc(scratch, need);
        if (!grown) return -2;
        scratch = grown, scratch_size = need;
    }
    float *sa = scratch, *asum = sa + (size_t)M * groups;
    int8_t *ia = (int8_t *)(asum + (size_t)M * groups);
    p.kernel->quantize8(M, K, group, A, ia, p.ldi, sa, asum);
    if (bits == 4) /* each 8 inputs as their even ones, then their odd ones: a word's low nibbles, then its high */
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k += 8) {
                int8_t *x = ia + (size_t)m * p.ldi + k, even[4] = {x[0], x[2], x[4], x[6]};
                int8_t odd[4] = {x[1], x[3], x[5], x[7]};
                memcpy(x, even, 4), memcpy(x + 4, odd, 4);
            }
    p.ia = ia, p.sa = sa, p.asum = asum;
    atomic_fetch_add_explicit(&count_quantized, 1, memory_order_relaxed);
    int parts = n_threads > 1 && (long)p.ldc * K >= THREAD_MIN_FLOATS * 4 ? n_threads : 1;
    run_parallel(packed_part, &p, parts);
    return 0;
}

/* Which kernel quantized_matmul_packed runs with the kernels in use: 2 VNNI, 1 AVX2 (vpmaddubsw on nibbles), 0
 * portable C (slower than quantized_matmul: core.cpu.quantized then keeps MLX's layout). */
int packed_fast(void) { return atomic_load(&quant_kernel)->packed_fast; }

/* ------------------------------------------------------------------------------------------------ entry */

static void call_fallback(int order, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (!fallback) fallback = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (!fallback) { /* never abort inside the bot's process: flag it, Python raises (kernel_take_error) */
        atomic_store(&kernel_error, 2);
        return;
    }
    atomic_fetch_add_explicit(&count_fallback, 1, memory_order_relaxed);
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
        /* columns are split in blocks the kernels take whole: 12 rows of B^T, or 16-64 columns of B (narrow
           products, like attention's probabilities times values, split in 16s so that every thread gets some) */
        product_t product = {transB, M, N, K, ldb, ldc, transB ? 12 : (N < 256 ? 16 : 64), a, B, C, alpha, beta};
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
    atomic_fetch_add_explicit(&count_skinny, 1, memory_order_relaxed);
    skinny(transA != NoTrans, transB != NoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ------------------------------------------------------------------------------------------------ control */

void skinny_set_fallback(void *fn) { fallback = (sgemm_fn)fn; }
void skinny_set_threads(int threads) {
    n_threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}
int skinny_max_rows(void) { return SKINNY_MAX_ROWS; }
const char *kernel_instruction_set(void) { return instruction_set; }
int kernel_abi_version(void) { return KERNEL_ABI; }

/* Products the skinny kernel took, products handed to the BLAS, attention calls, quantized products: out[0..3]. */
void kernel_counters(unsigned long long *out) {
    out[0] = atomic_load(&count_skinny), out[1] = atomic_load(&count_fallback), out[2] = atomic_load(&count_attention);
    out[3] = atomic_load(&count_quantized);
}

/* The error a void entry point could not return (2: no BLAS behind the kernel, 1: out of memory), cleared; 0 if none. */
int kernel_take_error(void) { return atomic_exchange(&kernel_error, 0); }

/* A generation brackets its calls with these: in between, idle workers spin SPIN_NS for the next product (a sleeping
 * worker woke late after every attention); outside, they sleep at once. Nested brackets count. */
void kernel_begin(void) { atomic_fetch_add(&spin_allowed, 1); }
void kernel_end(void) { atomic_fetch_sub(&spin_allowed, 1); }

/* An importable module, so that setuptools builds this file like any extension; core/blas.py loads it with
 * ctypes (globally, before MLX) and never imports it. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                    "CPU kernels: few-row cblas_sgemm, decode attention (loaded by core.cpu.blas)", -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
