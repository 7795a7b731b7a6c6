/* Attention on CPU for query tokens that each see a prefix of their sequence's keys, reading a head-major paged KV
 * pool in place: a step's decodes, and the few tokens of a short chunk (a decode with its drafts).
 *
 * The gather path (attention.py) first copies each sequence's keys and values out of the pool, then attends over
 * the copy; this reads each key and value once, where it lies. Built and loaded by hexgen/engine/cpu_decode.py
 * (gcc -O3 -march=native -fopenmp, at first use, cached).
 *
 * Layouts (row-major):
 *   q       [tokens, kv_heads * group, head_dim]    query heads h*group .. h*group+group-1 share KV head h;
 *                                                   a token's row q_stride elements after the one before
 *   pool    [blocks, 2 * kv_heads, block_size, head_dim]  a block's key heads, then its value heads
 *   tables  [sequences, max_blocks] int64           each sequence's blocks, in order
 *   seq     [tokens] int64                          each token's sequence (its row of tables)
 *   context [tokens] int64                          the keys each token sees: its sequence's first `context`, >= 1
 *   out     [tokens, kv_heads * group, head_dim]
 * Scores, the softmax and the weighted sum of values are in fp32 (online softmax, one block at a time); a bf16
 * output is rounded to nearest even. head_dim is a multiple of 8: the arithmetic is on vectors of 8 floats (GCC's
 * vector extensions, AVX2 or AVX-512 as -march=native allows), each key and value row read once and converted
 * 8 elements at a time. A KV head's query rows are its `group`, 1 to 16; groups of up to 8 are compiled each as a
 * constant, so that each row's running sums stay in registers.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 256
#define LANES 8

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline f32x8 load8_f32(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x8 load8_bf16(const uint16_t *p) {  /* bf16 is the high half of an fp32 */
    u16x8 h;
    memcpy(&h, p, sizeof h);
    u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    f32x8 v;
    memcpy(&v, &w, sizeof v);
    return v;
}

static inline float sum8(f32x8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline void store_bf16(uint16_t *p, int64_t i, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    p[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One (query token, KV head) pair: its `group` query rows over its `context` keys. Inlined with `group` a constant
 * where it is one (the switch below), so the loops over rows unroll and their sums live in registers. */
#define DEFINE_DECODE(NAME, T, LOAD8, STORE)                                                                   \
    static inline __attribute__((always_inline)) void NAME##_pair(                                             \
        const T *q, const T *pool, const int64_t *table, int64_t context, T *out, int64_t kv_heads,           \
        int64_t head, const int group, int64_t head_dim, int64_t block_size, float scale) {                   \
        const int64_t chunks = head_dim / LANES, head_stride = block_size * head_dim;                          \
        f32x8 query[MAX_GROUP][MAX_HEAD_DIM / LANES], acc[MAX_GROUP][MAX_HEAD_DIM / LANES];                    \
        float scores[MAX_GROUP][MAX_BLOCK_SIZE], row_max[MAX_GROUP], row_sum[MAX_GROUP];                       \
        for (int r = 0; r < group; r++) {                                                                      \
            for (int64_t c = 0; c < chunks; c++) {                                                            \
                query[r][c] = LOAD8(q + (head * group + r) * head_dim + c * LANES) * scale;                   \
                acc[r][c] = (f32x8){0};                                                                        \
            }                                                                                                  \
            row_max[r] = -FLT_MAX;                                                                             \
            row_sum[r] = 0.0f;                                                                                 \
        }                                                                                                      \
        for (int64_t start = 0, b = 0; start < context; start += block_size, b++) {                          \
            const int64_t n = context - start < block_size ? context - start : block_size;                    \
            const T *keys = pool + (table[b] * 2 * kv_heads + head) * head_stride;                            \
            const T *values = keys + kv_heads * head_stride;                                                   \
            for (int64_t j = 0; j < n; j++) { /* each key row read once, dotted with every query row */       \
                f32x8 dot[MAX_GROUP];                                                                          \
                for (int r = 0; r < group; r++) dot[r] = (f32x8){0};                                           \
                for (int64_t c = 0; c < chunks; c++) {                                                        \
                    const f32x8 key = LOAD8(keys + j * head_dim + c * LANES);                                  \
                    for (int r = 0; r < group; r++) dot[r] += query[r][c] * key;                               \
                }                                                                                              \
                for (int r = 0; r < group; r++) scores[r][j] = sum8(dot[r]);                                   \
            }                                                                                                  \
            for (int r = 0; r < group; r++) {                                                                  \
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
                for (int64_t c = 0; c < chunks; c++) acc[r][c] *= rescale;                                    \
            }                                                                                                  \
            for (int64_t c = 0; c < chunks; c++) { /* a chunk of every row's sum in registers over the block */ \
                f32x8 part[MAX_GROUP];                                                                         \
                for (int r = 0; r < group; r++) part[r] = acc[r][c];                                           \
                for (int64_t j = 0; j < n; j++) {                                                             \
                    const f32x8 value = LOAD8(values + j * head_dim + c * LANES);                              \
                    for (int r = 0; r < group; r++) part[r] += scores[r][j] * value;                           \
                }                                                                                              \
                for (int r = 0; r < group; r++) acc[r][c] = part[r];                                           \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < group; r++) {                                                                      \
            const float inv = 1.0f / row_sum[r];                                                               \
            for (int64_t c = 0; c < chunks; c++)                                                              \
                for (int i = 0; i < LANES; i++)                                                                \
                    STORE(out, (head * group + r) * head_dim + c * LANES + i, acc[r][c][i] * inv);             \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    static void NAME##_one(const T *q, const T *pool, const int64_t *table, int64_t context, T *out,         \
                           int64_t kv_heads, int64_t head, int64_t group, int64_t head_dim,                  \
                           int64_t block_size, float scale) {                                                 \
        switch (group) { /* constant groups: unrolled rows; the rest with the group as a variable */           \
        case 1: NAME##_pair(q, pool, table, context, out, kv_heads, head, 1, head_dim, block_size, scale); break; \
        case 2: NAME##_pair(q, pool, table, context, out, kv_heads, head, 2, head_dim, block_size, scale); break; \
        case 3: NAME##_pair(q, pool, table, context, out, kv_heads, head, 3, head_dim, block_size, scale); break; \
        case 4: NAME##_pair(q, pool, table, context, out, kv_heads, head, 4, head_dim, block_size, scale); break; \
        case 5: NAME##_pair(q, pool, table, context, out, kv_heads, head, 5, head_dim, block_size, scale); break; \
        case 6: NAME##_pair(q, pool, table, context, out, kv_heads, head, 6, head_dim, block_size, scale); break; \
        case 7: NAME##_pair(q, pool, table, context, out, kv_heads, head, 7, head_dim, block_size, scale); break; \
        case 8: NAME##_pair(q, pool, table, context, out, kv_heads, head, 8, head_dim, block_size, scale); break; \
        default: NAME##_pair(q, pool, table, context, out, kv_heads, head, (int)group, head_dim, block_size,   \
                             scale);                                                                           \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    void NAME(const T *q, int64_t q_stride, const T *pool, const int64_t *tables, const int64_t *seq,         \
              const int64_t *context, T *out, int64_t tokens, int64_t kv_heads, int64_t group, int64_t head_dim, \
              int64_t block_size, int64_t max_blocks, float scale, int64_t threads) {                         \
        const int64_t row = kv_heads * group * head_dim;                                                       \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads)")                          \
        for (int64_t t = 0; t < tokens; t++)                                                                  \
            for (int64_t h = 0; h < kv_heads; h++)                                                            \
                NAME##_one(q + t * q_stride, pool, tables + seq[t] * max_blocks, context[t], out + t * row,    \
                           kv_heads, h, group, head_dim, block_size, scale);                                  \
    }

DEFINE_DECODE(paged_decode_f32, float, load8_f32, store_f32)
DEFINE_DECODE(paged_decode_bf16, uint16_t, load8_bf16, store_bf16)

/* The limits the caller checks before calling. */
int64_t paged_decode_max_group(void) { return MAX_GROUP; }
int64_t paged_decode_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_decode_max_block_size(void) { return MAX_BLOCK_SIZE; }
int64_t paged_decode_head_dim_multiple(void) { return LANES; }
