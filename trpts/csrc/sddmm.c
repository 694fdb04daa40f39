/* Sparse weight gradient on the CPU: out[i, c] = sum_t g[t, i] * x[t, j[i, c]].
 *
 * x [T, n_in] and g [T, n_out] are float32 with unit column stride (row strides ldx, ldg);
 * j is int64 [n_out, C]; out is float32 [n_out, C]. Compiled and loaded by trpts/_native.py.
 *
 * Tokens are taken in tiles of TILE rows. Each tile of x and g is transposed into a small
 * buffer (8x8 AVX blocks where available) so that every selected entry is a dot product of two
 * contiguous TILE-long vectors (AVX-512, AVX2 or portable 16-lane code, a fixed summation
 * order for a given instruction set). Threads take disjoint ranges of tiles and their partial sums are
 * added in thread order, so results are deterministic for a given thread count. No [n_out,
 * n_in] or gathered [n_out, C, T] intermediate: memory is O(TILE * (n_in + n_out)) per thread.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64
#define LANES 16
#define MAX_THREADS 256

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX__)
/* 8x8 block: dst[q * ldd + p] = src[p * ld + q]. */
static inline void transpose8(const float *src, int64_t ld, float *dst, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld), r3 = _mm256_loadu_ps(src + 3 * ld);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

/* dst[k * TILE + r] = src[r * ld + k] for r < rows (<= TILE), k < n; rows >= `rows` are zero. */
static void transpose_tile(const float *restrict src, int64_t ld, int64_t n, int64_t rows, float *restrict dst) {
    int64_t r0 = 0;
    if (rows < TILE) memset(dst, 0, (size_t)(n * TILE) * sizeof(float));
#if defined(__AVX__)
    for (; r0 + 8 <= rows; r0 += 8) {
        int64_t k = 0;
        for (; k + 8 <= n; k += 8) transpose8(src + r0 * ld + k, ld, dst + k * TILE + r0, TILE);
        for (; k < n; ++k)
            for (int q = 0; q < 8; ++q) dst[k * TILE + r0 + q] = src[(r0 + q) * ld + k];
    }
#endif
    for (; r0 < rows; ++r0)
        for (int64_t k = 0; k < n; ++k) dst[k * TILE + r0] = src[r0 * ld + k];
}

/* sum_r a[r] * b[r] over one tile, in a fixed order for a given instruction set. */
static inline float dot_tile(const float *restrict a, const float *restrict b) {
#if defined(__AVX512F__)
    __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(a + 16), _mm512_loadu_ps(b + 16));
    v0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 32), _mm512_loadu_ps(b + 32), v0);
    v1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 48), _mm512_loadu_ps(b + 48), v1);
    return _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8));
    for (int r = 16; r < TILE; r += 16) {
        v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + r), _mm256_loadu_ps(b + r), v0);
        v1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + r + 8), _mm256_loadu_ps(b + r + 8), v1);
    }
    __m256 v = _mm256_add_ps(v0, v1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
#else
    float p[LANES] = {0};
    for (int r0 = 0; r0 < TILE; r0 += LANES)
        for (int q = 0; q < LANES; ++q) p[q] += a[r0 + q] * b[r0 + q];
    for (int w = LANES / 2; w > 0; w >>= 1)
        for (int q = 0; q < w; ++q) p[q] += p[q + w];
    return p[0];
#endif
}

typedef struct {
    const float *x, *g;
    const int64_t *j;
    int64_t ldx, ldg, n_in, n_out, C, t0, t1;
    float *acc; /* [n_out, C], zeroed */
    int status;
} job_t;

static void *run(void *arg) {
    job_t *a = (job_t *)arg;
    const int64_t n_out = a->n_out, C = a->C;
    float *xt = (float *)malloc((size_t)(a->n_in * TILE) * sizeof(float));
    float *gt = (float *)malloc((size_t)(n_out * TILE) * sizeof(float));
    float *restrict acc = a->acc;
    if (!xt || !gt) {
        free(xt);
        free(gt);
        a->status = 1;
        return NULL;
    }
    for (int64_t s = a->t0; s < a->t1; s += TILE) {
        const int64_t rows = a->t1 - s < TILE ? a->t1 - s : TILE;
        transpose_tile(a->x + s * a->ldx, a->ldx, a->n_in, rows, xt);
        transpose_tile(a->g + s * a->ldg, a->ldg, n_out, rows, gt);
        for (int64_t i = 0; i < n_out; ++i) {
            const float *restrict gi = gt + i * TILE;
            for (int64_t c = 0; c < C; ++c) {
                const float *restrict xj = xt + a->j[i * C + c] * TILE;
                acc[i * C + c] += dot_tile(gi, xj);
            }
        }
    }
    free(xt);
    free(gt);
    return NULL;
}

/* Returns 0 on success, 1 if out of memory, 2 if an index is outside [0, n_in). */
int trpts_sddmm(const float *x, int64_t ldx, int64_t n_in, const float *g, int64_t ldg, int64_t n_out,
                const int64_t *j, int64_t C, int64_t T, float *out, int64_t threads) {
    for (int64_t e = 0; e < n_out * C; ++e)
        if (j[e] < 0 || j[e] >= n_in) return 2;
    memset(out, 0, (size_t)(n_out * C) * sizeof(float));
    const int64_t tiles = (T + TILE - 1) / TILE;
    if (tiles == 0 || n_out * C == 0) return 0;
    if (threads > tiles) threads = tiles;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    const int64_t per = (tiles + threads - 1) / threads * TILE;
    float *part = NULL;
    if (threads > 1 && !(part = (float *)calloc((size_t)((threads - 1) * n_out * C), sizeof(float)))) return 1;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t used = 0;
    for (int64_t k = 0; k < threads && k * per < T; ++k, ++used) {
        const int64_t t0 = k * per, t1 = t0 + per < T ? t0 + per : T;
        jobs[k] = (job_t){x, g, j, ldx, ldg, n_in, n_out, C, t0, t1, k ? part + (k - 1) * n_out * C : out, 0};
    }
    for (int64_t k = 1; k < used; ++k) started[k] = pthread_create(&tids[k], NULL, run, &jobs[k]) == 0;
    run(&jobs[0]);
    int status = jobs[0].status;
    for (int64_t k = 1; k < used; ++k) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            run(&jobs[k]);
        status |= jobs[k].status;
        for (int64_t e = 0; e < n_out * C; ++e) out[e] += jobs[k].acc[e];
    }
    free(part);
    return status ? 1 : 0;
}
