/* Decode attention on CPU that reads a head-major paged KV pool in place: one query token per sequence.
 *
 * The gather path (attention.py) first copies each sequence's keys and values out of the pool, then attends over
 * the copy, so a long-context decode step reads its cache three times; this reads it once. Built and loaded by
 * hexgen/engine/cpu_decode.py (gcc -O3 -march=native -fopenmp, at first use, cached).
 *
 * Layouts (row-major):
 *   q       [batch, kv_heads * group, head_dim]     query heads h*group .. h*group+group-1 share KV head h;
 *                                                   a sequence's row q_stride elements after the one before
 *   pool    [blocks, 2 * kv_heads, block_size, head_dim]  a block's key heads, then its value heads
 *   tables  [batch, max_blocks] int64               each sequence's blocks, in order
 *   context [batch] int64                           tokens cached per sequence (this step's key included), >= 1
 *   out     [batch, kv_heads * group, head_dim]
 * Scores, the softmax and the weighted sum of values are in fp32 (online softmax, one block at a time); a bf16
 * output is rounded to nearest even.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 256

static inline float load_f32(const float *p, int64_t i) { return p[i]; }

static inline float load_bf16(const uint16_t *p, int64_t i) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)p[i] << 16;
    return v.f;
}

static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline void store_bf16(uint16_t *p, int64_t i, float x) {
    union { uint32_t u; float f; } v;
    v.f = x;
    p[i] = (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* One (sequence, KV head) pair: its `group` query rows over its `context` keys. */
#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                                    \
    static void NAME##_one(const T *q, const T *pool, const int64_t *table, int64_t context, T *out,         \
                           int64_t kv_heads, int64_t head, int64_t group, int64_t head_dim,                  \
                           int64_t block_size, float scale) {                                                 \
        float query[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];                                    \
        float scores[MAX_GROUP][MAX_BLOCK_SIZE], row_max[MAX_GROUP], row_sum[MAX_GROUP];                       \
        float key[MAX_HEAD_DIM];                                                                               \
        const int64_t head_stride = block_size * head_dim;                                                     \
        for (int64_t r = 0; r < group; r++) {                                                                 \
            for (int64_t i = 0; i < head_dim; i++) {                                                          \
                query[r][i] = LOAD(q, (head * group + r) * head_dim + i) * scale;                             \
                acc[r][i] = 0.0f;                                                                              \
            }                                                                                                  \
            row_max[r] = -FLT_MAX;                                                                             \
            row_sum[r] = 0.0f;                                                                                 \
        }                                                                                                      \
        for (int64_t start = 0, b = 0; start < context; start += block_size, b++) {                          \
            const int64_t n = context - start < block_size ? context - start : block_size;                    \
            const T *keys = pool + (table[b] * 2 * kv_heads + head) * head_stride;                            \
            const T *values = keys + kv_heads * head_stride;                                                   \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                for (int64_t i = 0; i < head_dim; i++) key[i] = LOAD(keys, j * head_dim + i);                 \
                for (int64_t r = 0; r < group; r++) {                                                         \
                    float dot = 0.0f;                                                                          \
                    _Pragma("omp simd reduction(+:dot)")                                                       \
                    for (int64_t i = 0; i < head_dim; i++) dot += query[r][i] * key[i];                       \
                    scores[r][j] = dot;                                                                        \
                }                                                                                              \
            }                                                                                                  \
            for (int64_t r = 0; r < group; r++) {                                                             \
                float block_max = row_max[r];                                                                  \
                for (int64_t j = 0; j < n; j++) block_max = scores[r][j] > block_max ? scores[r][j] : block_max; \
                const float rescale = expf(row_max[r] - block_max);                                           \
                float sum = 0.0f;                                                                              \
                for (int64_t j = 0; j < n; j++) {                                                             \
                    scores[r][j] = expf(scores[r][j] - block_max);                                            \
                    sum += scores[r][j];                                                                       \
                }                                                                                              \
                row_sum[r] = row_sum[r] * rescale + sum;                                                       \
                row_max[r] = block_max;                                                                        \
                for (int64_t i = 0; i < head_dim; i++) acc[r][i] *= rescale;                                  \
            }                                                                                                  \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                for (int64_t i = 0; i < head_dim; i++) key[i] = LOAD(values, j * head_dim + i);               \
                for (int64_t r = 0; r < group; r++) {                                                         \
                    const float p = scores[r][j];                                                              \
                    _Pragma("omp simd")                                                                        \
                    for (int64_t i = 0; i < head_dim; i++) acc[r][i] += p * key[i];                           \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t r = 0; r < group; r++) {                                                                 \
            const float inv = 1.0f / row_sum[r];                                                               \
            for (int64_t i = 0; i < head_dim; i++) STORE(out, (head * group + r) * head_dim + i, acc[r][i] * inv); \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    void NAME(const T *q, int64_t q_stride, const T *pool, const int64_t *tables, const int64_t *context,     \
              T *out, int64_t batch, int64_t kv_heads, int64_t group, int64_t head_dim, int64_t block_size,  \
              int64_t max_blocks, float scale, int64_t threads) {                                             \
        const int64_t row = kv_heads * group * head_dim;                                                       \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads)")                          \
        for (int64_t s = 0; s < batch; s++)                                                                   \
            for (int64_t h = 0; h < kv_heads; h++)                                                            \
                NAME##_one(q + s * q_stride, pool, tables + s * max_blocks, context[s], out + s * row, kv_heads, h, \
                           group, head_dim, block_size, scale);                                               \
    }

DEFINE_DECODE(paged_decode_f32, float, load_f32, store_f32)
DEFINE_DECODE(paged_decode_bf16, uint16_t, load_bf16, store_bf16)

/* The limits the caller checks before calling. */
int64_t paged_decode_max_group(void) { return MAX_GROUP; }
int64_t paged_decode_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_decode_max_block_size(void) { return MAX_BLOCK_SIZE; }
