/* Causal attention on CPU for a whole step, prefill chunks and decodes mixed, reading a head-major paged KV pool in
 * place through the block tables (no gather, no mask tensor). Built and loaded by hexgen/engine/cpu_attention.py
 * (gcc -O3 -march=native -fopenmp, at first use, cached).
 *
 * Layouts (row-major):
 *   q       [tokens, kv_heads * group, head_dim]    query heads h*group .. h*group+group-1 share KV head h;
 *                                                   a token's row q_stride elements after the one before
 *   pool    [blocks, 2 * kv_heads, block_size, head_dim]  a block's key heads, then its value heads
 *   tables  [sequences, max_blocks] int64           each sequence's blocks, in order
 *   tasks   [n_tasks, 4] int64                      (first token's row in q, tokens, sequence, first token's
 *                                                   position): token i of a task sits at position + i of its
 *                                                   sequence and sees that sequence's keys 0 .. position + i
 *   out     [tokens, kv_heads * group, head_dim]
 * One OpenMP task per (task, KV head), handed out dynamically in the order given (the caller puts the costly first).
 *
 * A task of one token (a decode) takes `one_token`: each key and value row read once and dotted with the KV head's
 * `group` query rows, whose sums stay in registers (vectors of 16 floats with AVX-512 where head_dim is a multiple
 * of 16, else of 8; groups of up to 8 compiled as constants).
 * A task of several tokens (a tile of a prefill chunk, or a decode with its drafts) takes `tile`: its query rows
 * (tokens x group, at most TILE_ROWS) meet the keys SPAN at a time. A span's keys are copied once into a transposed
 * buffer, scores for 2 or 4 rows x 32 keys are built in registers, then an online-softmax update, then the weighted
 * values for 4 rows x a vector of dims in registers: each key serves every row of the tile. With AVX512_BF16
 * (gcc defines __AVX512BF16__ when -march=native finds it), bf16 tiles take the products two bf16 at a time into
 * fp32 (vdpbf16ps); the probabilities are then rounded to bf16 before their product with the values, as a bf16 model's
 * eager attention does. Otherwise the arithmetic is fp32 on GCC's vector extensions (AVX2 or AVX-512 as
 * -march=native allows). Scores, the softmax and the sums are fp32 everywhere; a bf16 output is rounded to nearest
 * even. head_dim is a multiple of 8.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 256
#define HEAD_DIM_MULTIPLE 8
#define TILE_ROWS 64   /* query rows (tokens x group) of one tile */
#define SPAN 32        /* keys a tile takes at once */
#define MASKED (-1e30f) /* below any score: finite, as -ffast-math assumes */
/* exp(-80) = 1.8e-35: nothing beside the row's largest term, exp(0) = 1. Tiles and decodes hold every exponent above
 * it: libm's vector expf takes a slow scalar path for lanes that underflow. */
#define EXP_FLOOR (-80.0f)

typedef float f32x8 __attribute__((vector_size(32)));
/* The tiles' fp32 vectors: 16 floats where AVX-512 has the registers, else 8 (a wider GCC vector would be split
 * into many narrow ones and spilled). */
#ifdef __AVX512F__
#define VL 16
/* The vectors of a row's output summed at once over a span (4 rows: 4 x PV_VECTORS independent sums). On the Zen 4
 * EPYC 1 ran fastest with AVX-512 (2 and 4 took 5-25% longer); built for AVX2, 2 took 0.6x 1's time. */
#define PV_VECTORS 1
#else
#define VL 8
#define PV_VECTORS 2
#endif
typedef float fvec __attribute__((vector_size(VL * 4)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16xv __attribute__((vector_size(VL * 2)));
typedef uint32_t u32xv __attribute__((vector_size(VL * 4)));

static inline f32x8 load8_f32(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* NAME(p): the bf16 at p as a vector V of fp32 (bf16 is the high half of an fp32), through integer vectors U16, U32
 * of as many lanes. */
#define DEFINE_LOAD_BF16(NAME, V, U16, U32)                                                                     \
    static inline V NAME(const uint16_t *p) {                                                                   \
        U16 h;                                                                                                  \
        memcpy(&h, p, sizeof h);                                                                                \
        U32 w = __builtin_convertvector(h, U32) << 16;                                                          \
        V v;                                                                                                    \
        memcpy(&v, &w, sizeof v);                                                                               \
        return v;                                                                                               \
    }

DEFINE_LOAD_BF16(load8_bf16, f32x8, u16x8, u32x8)
DEFINE_LOAD_BF16(loadv_bf16, fvec, u16xv, u32xv)

static inline float load1_f32(const float *p, int64_t i) { return p[i]; }

static inline float load1_bf16(const uint16_t *p, int64_t i) {
    const uint32_t u = (uint32_t)p[i] << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static inline fvec loadv(const float *p) {
    fvec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, fvec v) { memcpy(p, &v, sizeof v); }

static inline void store8_f32(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }

static inline float sumv(fvec v) { /* in any order: -ffast-math reassociates it anyway */
    float sum = 0.0f;
    for (int i = 0; i < VL; i++) sum += v[i];
    return sum;
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

/* The rows of a key and of a value: position `pos` of the sequence whose blocks are `table`, KV head `head`. */
#define KEY_ROW(pool, table, pos, head)                                                                         \
    ((pool) + (((table)[(pos) / block_size] * 2 * kv_heads + (head)) * block_size + (pos) % block_size) * head_dim)
#define VALUE_OFFSET (kv_heads * block_size * head_dim)

/* acc rows r .. r+3, dims d .. d + K vectors of V: += the span's probabilities (scores) times its values; 4 x K sums
 * in registers over the span. */
#define WEIGHTED_VALUES(V, K, LOAD, STORE)                                                                      \
    do {                                                                                                        \
        const int64_t width = sizeof(V) / sizeof(float);                                                        \
        V part[4][K];                                                                                           \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int k = 0; k < (K); k++) part[i][k] = LOAD(acc + (r + i) * head_dim + d + k * width);          \
        for (int64_t j = 0; j < n; j++)                                                                         \
            for (int k = 0; k < (K); k++) {                                                                     \
                const V value = LOAD(values + j * head_dim + d + k * width);                                    \
                for (int i = 0; i < 4; i++) part[i][k] += scores[(r + i) * SPAN + j] * value;                   \
            }                                                                                                   \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int k = 0; k < (K); k++) STORE(acc + (r + i) * head_dim + d + k * width, part[i][k]);          \
        d += (K) * width;                                                                                       \
    } while (0)

/* One row's online-softmax step over a span of scores: moves the running max over the first `visible` keys,
 * rescales the row's sum and output, and leaves exp(score - max) in `row` (0 for the keys past `visible`). */
static inline void softmax_step(float *row, int64_t visible, float *row_max, float *row_sum, float *acc,
                                int64_t head_dim) {
    const int64_t seen = visible < 0 ? 0 : visible < SPAN ? visible : SPAN;
    float top = *row_max;
    for (int64_t j = 0; j < seen; j++) top = row[j] > top ? row[j] : top;
    /* exponents held in [EXP_FLOOR, 0] on every lane, the hidden keys' too (then dropped): libm's vector expf
     * takes a slow scalar path for lanes that underflow or overflow */
    const float rescale = expf(fmaxf(*row_max - top, EXP_FLOOR));
    float sum = 0.0f;
    for (int64_t j = 0; j < SPAN; j++) {
        const float weight = expf(fminf(fmaxf(row[j] - top, EXP_FLOOR), 0.0f));
        row[j] = j < seen ? weight : 0.0f; /* hidden keys: weight 0 */
        sum += row[j];
    }
    *row_sum = *row_sum * rescale + sum;
    *row_max = top;
    for (int64_t d = 0; d < head_dim; d++) acc[d] *= rescale;
}

#define DEFINE_TOKEN(NAME, T, V, W, LOADV, SUM, STORE)                                                          \
    /* One token, one KV head: its `group` query rows over its `context` keys. Inlined with `group` a constant  \
     * where it is one (the switch below), so the loops over rows unroll and their sums live in registers. */     \
    static inline __attribute__((always_inline)) void NAME##_token(                                             \
        const T *q, const T *pool, const int64_t *table, int64_t context, T *out, int64_t kv_heads,             \
        int64_t head, const int group, int64_t head_dim, int64_t block_size, float scale) {                     \
        const int64_t chunks = head_dim / W;                                                                    \
        V query[MAX_GROUP][MAX_HEAD_DIM / W], acc[MAX_GROUP][MAX_HEAD_DIM / W];                                 \
        float scores[MAX_GROUP][MAX_BLOCK_SIZE], row_max[MAX_GROUP], row_sum[MAX_GROUP];                        \
        for (int r = 0; r < group; r++) {                                                                       \
            for (int64_t c = 0; c < chunks; c++) {                                                              \
                query[r][c] = LOADV(q + (head * group + r) * head_dim + c * W) * scale;                         \
                acc[r][c] = (V){0};                                                                             \
            }                                                                                                   \
            row_max[r] = MASKED;                                                                                \
            row_sum[r] = 0.0f;                                                                                  \
        }                                                                                                       \
        for (int64_t start = 0; start < context; start += block_size) {                                         \
            const int64_t n = context - start < block_size ? context - start : block_size;                      \
            const T *keys = KEY_ROW(pool, table, start, head), *values = keys + VALUE_OFFSET;                   \
            for (int64_t j = 0; j < n; j++) { /* each key row read once, dotted with every query row */         \
                V dot[MAX_GROUP];                                                                               \
                for (int r = 0; r < group; r++) dot[r] = (V){0};                                                \
                for (int64_t c = 0; c < chunks; c++) {                                                          \
                    const V key = LOADV(keys + j * head_dim + c * W);                                           \
                    for (int r = 0; r < group; r++) dot[r] += query[r][c] * key;                                \
                }                                                                                               \
                for (int r = 0; r < group; r++) scores[r][j] = SUM(dot[r]);                                     \
            }                                                                                                   \
            for (int r = 0; r < group; r++) {                                                                   \
                float block_max = row_max[r];                                                                   \
                for (int64_t j = 0; j < n; j++) block_max = scores[r][j] > block_max ? scores[r][j] : block_max; \
                const float rescale = expf(fmaxf(row_max[r] - block_max, EXP_FLOOR));                           \
                float sum = 0.0f;                                                                               \
                for (int64_t j = 0; j < n; j++) {                                                               \
                    scores[r][j] = expf(fmaxf(scores[r][j] - block_max, EXP_FLOOR));                           \
                    sum += scores[r][j];                                                                        \
                }                                                                                               \
                row_sum[r] = row_sum[r] * rescale + sum;                                                        \
                row_max[r] = block_max;                                                                         \
                for (int64_t c = 0; c < chunks; c++) acc[r][c] *= rescale;                                      \
            }                                                                                                   \
            for (int64_t c = 0; c < chunks; c++) { /* a chunk of every row's sum in registers over the block */  \
                V part[MAX_GROUP];                                                                              \
                for (int r = 0; r < group; r++) part[r] = acc[r][c];                                            \
                for (int64_t j = 0; j < n; j++) {                                                               \
                    const V value = LOADV(values + j * head_dim + c * W);                                       \
                    for (int r = 0; r < group; r++) part[r] += scores[r][j] * value;                            \
                }                                                                                               \
                for (int r = 0; r < group; r++) acc[r][c] = part[r];                                            \
            }                                                                                                   \
        }                                                                                                       \
        for (int r = 0; r < group; r++) {                                                                       \
            const float inv = 1.0f / row_sum[r];                                                                \
            for (int64_t c = 0; c < chunks; c++)                                                                \
                for (int i = 0; i < W; i++)                                                                     \
                    STORE(out, (head * group + r) * head_dim + c * W + i, acc[r][c][i] * inv);                  \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    static void NAME##_one_token(const T *q, const T *pool, const int64_t *table, int64_t context, T *out,      \
                                 int64_t kv_heads, int64_t head, int64_t group, int64_t head_dim,               \
                                 int64_t block_size, float scale) {                                             \
        switch (group) { /* constant groups: unrolled rows; the rest with the group as a variable */            \
        case 1: NAME##_token(q, pool, table, context, out, kv_heads, head, 1, head_dim, block_size, scale); break; \
        case 2: NAME##_token(q, pool, table, context, out, kv_heads, head, 2, head_dim, block_size, scale); break; \
        case 3: NAME##_token(q, pool, table, context, out, kv_heads, head, 3, head_dim, block_size, scale); break; \
        case 4: NAME##_token(q, pool, table, context, out, kv_heads, head, 4, head_dim, block_size, scale); break; \
        case 5: NAME##_token(q, pool, table, context, out, kv_heads, head, 5, head_dim, block_size, scale); break; \
        case 6: NAME##_token(q, pool, table, context, out, kv_heads, head, 6, head_dim, block_size, scale); break; \
        case 7: NAME##_token(q, pool, table, context, out, kv_heads, head, 7, head_dim, block_size, scale); break; \
        case 8: NAME##_token(q, pool, table, context, out, kv_heads, head, 8, head_dim, block_size, scale); break; \
        default: NAME##_token(q, pool, table, context, out, kv_heads, head, (int)group, head_dim, block_size,   \
                              scale);                                                                           \
        }                                                                                                       \
    }                                                                                                           \

#define DEFINE_ATTENTION(NAME, T, LOAD1, STORE)                                                                 \
    /* A tile: `tokens` consecutive tokens from `position` on, one KV head, in fp32 vectors of VL. Row r is token \
     * r / group, query head head * group + r % group; rows up to a multiple of 4 are padded with zero queries. */ \
    static __attribute__((unused)) void NAME##_tile_f32(                                                        \
        const T *q, int64_t q_stride, const T *pool, const int64_t *table, int64_t position, int64_t tokens, T *out, \
        int64_t out_stride, int64_t kv_heads, int64_t head, int64_t group, int64_t head_dim, int64_t block_size,    \
        float scale) {                                                                                          \
        const int64_t rows = tokens * group, padded = (rows + 3) & ~(int64_t)3, end = position + tokens;        \
        float query[TILE_ROWS * MAX_HEAD_DIM], acc[TILE_ROWS * MAX_HEAD_DIM], scores[TILE_ROWS * SPAN];         \
        float keys_t[MAX_HEAD_DIM * SPAN], values[SPAN * MAX_HEAD_DIM]; /* a span's keys transposed: [d][key] */ \
        float row_max[TILE_ROWS], row_sum[TILE_ROWS];                                                           \
        for (int64_t r = 0; r < padded; r++) {                                                                  \
            const T *src = q + (r / group) * q_stride + (head * group + r % group) * head_dim;                  \
            for (int64_t d = 0; d < head_dim; d++) {                                                            \
                query[r * head_dim + d] = r < rows ? LOAD1(src, d) * scale : 0.0f;                              \
                acc[r * head_dim + d] = 0.0f;                                                                   \
            }                                                                                                   \
            row_max[r] = MASKED;                                                                                \
            row_sum[r] = 0.0f;                                                                                  \
        }                                                                                                       \
        for (int64_t first = 0; first < end; first += SPAN) {                                                   \
            const int64_t n = end - first < SPAN ? end - first : SPAN;                                          \
            for (int64_t j = 0; j < SPAN; j++) { /* keys past the end: zeros, their scores hidden below */      \
                const T *key = j < n ? KEY_ROW(pool, table, first + j, head) : NULL;                            \
                for (int64_t d = 0; d < head_dim; d++) {                                                        \
                    keys_t[d * SPAN + j] = key ? LOAD1(key, d) : 0.0f;                                          \
                    values[j * head_dim + d] = key ? LOAD1(key + VALUE_OFFSET, d) : 0.0f;                       \
                }                                                                                               \
            }                                                                                                   \
            for (int64_t r = 0; r < padded; r += 2) { /* scores of 2 rows x 32 keys in registers */             \
                fvec s[2][SPAN / VL] = {{{0}}};                                                                 \
                for (int64_t d = 0; d < head_dim; d++)                                                          \
                    for (int k = 0; k < SPAN / VL; k++) {                                                       \
                        const fvec key = loadv(keys_t + d * SPAN + k * VL);                                     \
                        s[0][k] += query[r * head_dim + d] * key;                                               \
                        s[1][k] += query[(r + 1) * head_dim + d] * key;                                         \
                    }                                                                                           \
                for (int i = 0; i < 2; i++)                                                                     \
                    for (int k = 0; k < SPAN / VL; k++) storev(scores + (r + i) * SPAN + k * VL, s[i][k]);      \
            }                                                                                                   \
            for (int64_t r = 0; r < padded; r++)                                                                \
                softmax_step(scores + r * SPAN, position + r / group + 1 - first, &row_max[r], &row_sum[r],     \
                             acc + r * head_dim, head_dim);                                                     \
            for (int64_t r = 0; r < padded; r += 4) { /* 4 rows x VL dims at a time, in registers over the span */ \
                int64_t d = 0;                                                                                  \
                while (d + PV_VECTORS * VL <= head_dim) WEIGHTED_VALUES(fvec, PV_VECTORS, loadv, storev);       \
                while (d + VL <= head_dim) WEIGHTED_VALUES(fvec, 1, loadv, storev);                             \
                if (d < head_dim) WEIGHTED_VALUES(f32x8, 1, load8_f32, store8_f32); /* 8 dims left (AVX-512) */ \
            }                                                                                                   \
        }                                                                                                       \
        for (int64_t r = 0; r < rows; r++) {                                                                    \
            const float inv = 1.0f / row_sum[r];                                                                \
            T *dst = out + (r / group) * out_stride + (head * group + r % group) * head_dim;                    \
            for (int64_t d = 0; d < head_dim; d++) STORE(dst, d, acc[r * head_dim + d] * inv);                  \
        }                                                                                                       \
    }

/* Decodes in vectors of 8 floats, and of 16 where AVX-512 has them and head_dim allows (on the Zen 4 EPYC, 16
 * decodes of SmolLM2's heads over 100 and 1,040 keys: 10-21% less time than in vectors of 8). */
DEFINE_TOKEN(f32_8, float, f32x8, 8, load8_f32, sum8, store_f32)
DEFINE_TOKEN(bf16_8, uint16_t, f32x8, 8, load8_bf16, sum8, store_bf16)
#if VL == 16
DEFINE_TOKEN(f32_16, float, fvec, 16, loadv, sumv, store_f32)
DEFINE_TOKEN(bf16_16, uint16_t, fvec, 16, loadv_bf16, sumv, store_bf16)
#define ONE_TOKEN(PREFIX, head_dim) ((head_dim) % 16 == 0 ? PREFIX##_16_one_token : PREFIX##_8_one_token)
#else
#define ONE_TOKEN(PREFIX, head_dim) PREFIX##_8_one_token
#endif

DEFINE_ATTENTION(f32, float, load1_f32, store_f32)
DEFINE_ATTENTION(bf16, uint16_t, load1_bf16, store_bf16)

#ifdef __AVX512BF16__
/* acc rows r .. r+3, dims d .. d + 16 K: += the span's probabilities (bf16 pairs) times its values (interleaved
 * pairs), 4 x K sums in registers over the span (K = 1 measured fastest on the Zen 4 EPYC; 2 and 4 took longer). */
#define DOT_VALUES(K)                                                                                           \
    do {                                                                                                        \
        __m512 part[4][K];                                                                                      \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int k = 0; k < (K); k++) part[i][k] = _mm512_loadu_ps(acc + (r + i) * head_dim + d + 16 * k);  \
        for (int64_t p = 0; p < pairs; p++)                                                                     \
            for (int k = 0; k < (K); k++) {                                                                     \
                const __m512bh value = (__m512bh)_mm512_loadu_si512(values + p * head_dim + d + 16 * k);        \
                for (int i = 0; i < 4; i++)                                                                     \
                    part[i][k] = _mm512_dpbf16_ps(part[i][k], value,                                            \
                                                  (__m512bh)_mm512_set1_epi32((int)probs[(r + i) * (SPAN / 2) + p])); \
            }                                                                                                   \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int k = 0; k < (K); k++) _mm512_storeu_ps(acc + (r + i) * head_dim + d + 16 * k, part[i][k]);  \
        d += 16 * (K);                                                                                          \
    } while (0)

/* A bf16 tile with the products two at a time (vdpbf16ps: fp32 sums of bf16 pairs). Query rows are kept as pairs
 * of bf16 (one 32-bit word per two dims); a span's keys are laid out word-major ([d / 2][key]), so a register of
 * 16 keys' words meets one broadcast query word; a span's values are interleaved two keys at a time
 * ([key / 2][d]: value 2i's and 2i+1's element d in one word), and the probabilities rounded to bf16 pairs. */
static void bf16_tile_dot(const uint16_t *q, int64_t q_stride, const uint16_t *pool, const int64_t *table,
                          int64_t position, int64_t tokens, uint16_t *out, int64_t out_stride, int64_t kv_heads,
                          int64_t head, int64_t group, int64_t head_dim, int64_t block_size, float scale) {
    const int64_t rows = tokens * group, padded = (rows + 3) & ~(int64_t)3, end = position + tokens;
    const int64_t words = head_dim / 2;
    uint32_t query[TILE_ROWS * MAX_HEAD_DIM / 2], probs[TILE_ROWS * SPAN / 2];
    uint32_t keys_t[MAX_HEAD_DIM / 2 * SPAN], values[SPAN / 2 * MAX_HEAD_DIM];
    float acc[TILE_ROWS * MAX_HEAD_DIM], scores[TILE_ROWS * SPAN], row_max[TILE_ROWS], row_sum[TILE_ROWS];
    for (int64_t r = 0; r < padded; r++) {
        const uint16_t *src = q + (r / group) * q_stride + (head * group + r % group) * head_dim;
        for (int64_t w = 0; w < words; w++) {
            uint32_t word = 0;
            if (r < rows) memcpy(&word, src + 2 * w, sizeof word);
            query[r * words + w] = word;
        }
        for (int64_t d = 0; d < head_dim; d++) acc[r * head_dim + d] = 0.0f;
        row_max[r] = MASKED;
        row_sum[r] = 0.0f;
    }
    const __m512 scales = _mm512_set1_ps(scale);
    for (int64_t first = 0; first < end; first += SPAN) {
        const int64_t n = end - first < SPAN ? end - first : SPAN;
        for (int64_t j = 0; j < SPAN; j += 2) { /* keys past the end: zeros, their scores hidden below */
            const uint16_t *k0 = j < n ? KEY_ROW(pool, table, first + j, head) : NULL;
            const uint16_t *k1 = j + 1 < n ? KEY_ROW(pool, table, first + j + 1, head) : NULL;
            for (int64_t w = 0; w < words; w++) {
                uint32_t a = 0, b = 0;
                if (k0) memcpy(&a, k0 + 2 * w, sizeof a);
                if (k1) memcpy(&b, k1 + 2 * w, sizeof b);
                keys_t[w * SPAN + j] = a;
                keys_t[w * SPAN + j + 1] = b;
            }
            for (int64_t d = 0; d < head_dim; d++)
                values[(j / 2) * head_dim + d] = (uint32_t)(k0 ? k0[VALUE_OFFSET + d] : 0)
                                                 | (uint32_t)(k1 ? k1[VALUE_OFFSET + d] : 0) << 16;
        }
        for (int64_t r = 0; r < padded; r += 4) { /* scores of 4 rows x 32 keys in 8 registers */
            __m512 s[4][2];
            for (int i = 0; i < 4; i++) s[i][0] = s[i][1] = _mm512_setzero_ps();
            for (int64_t w = 0; w < words; w++) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(keys_t + w * SPAN);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(keys_t + w * SPAN + 16);
                for (int i = 0; i < 4; i++) {
                    const __m512bh x = (__m512bh)_mm512_set1_epi32((int)query[(r + i) * words + w]);
                    s[i][0] = _mm512_dpbf16_ps(s[i][0], k0, x);
                    s[i][1] = _mm512_dpbf16_ps(s[i][1], k1, x);
                }
            }
            for (int i = 0; i < 4; i++) {
                _mm512_storeu_ps(scores + (r + i) * SPAN, _mm512_mul_ps(s[i][0], scales));
                _mm512_storeu_ps(scores + (r + i) * SPAN + 16, _mm512_mul_ps(s[i][1], scales));
            }
        }
        for (int64_t r = 0; r < padded; r++) {
            float *row = scores + r * SPAN;
            softmax_step(row, position + r / group + 1 - first, &row_max[r], &row_sum[r], acc + r * head_dim,
                         head_dim);
            /* 32 probabilities -> 16 words of bf16 pairs, key 2i in the low half */
            _mm512_storeu_si512(probs + r * (SPAN / 2),
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row)));
        }
        const int64_t pairs = (n + 1) / 2;
        for (int64_t r = 0; r < padded; r += 4) { /* 4 rows x 16 dims at a time, in registers over the span */
            int64_t d = 0;
            while (d + 16 <= head_dim) DOT_VALUES(1);
            if (d < head_dim) { /* 8 dims left */
                __m256 part[4];
                for (int i = 0; i < 4; i++) part[i] = _mm256_loadu_ps(acc + (r + i) * head_dim + d);
                for (int64_t p = 0; p < pairs; p++) {
                    const __m256bh value = (__m256bh)_mm256_loadu_si256((const __m256i *)(values + p * head_dim + d));
                    for (int i = 0; i < 4; i++)
                        part[i] = _mm256_dpbf16_ps(part[i], value,
                                                   (__m256bh)_mm256_set1_epi32((int)probs[(r + i) * (SPAN / 2) + p]));
                }
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(acc + (r + i) * head_dim + d, part[i]);
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.0f / row_sum[r];
        uint16_t *dst = out + (r / group) * out_stride + (head * group + r % group) * head_dim;
        for (int64_t d = 0; d < head_dim; d++) store_bf16(dst, d, acc[r * head_dim + d] * inv);
    }
}
#define BF16_TILE bf16_tile_dot
#define BF16_DOT_PRODUCTS 1
#else
#define BF16_TILE bf16_tile_f32
#define BF16_DOT_PRODUCTS 0
#endif

#define DEFINE_ENTRY(NAME, T, PREFIX, TILE)                                                                     \
    void NAME(const T *q, int64_t q_stride, const T *pool, const int64_t *tables, int64_t max_blocks,           \
              const int64_t *tasks, int64_t n_tasks, T *out, int64_t kv_heads, int64_t group, int64_t head_dim, \
              int64_t block_size, float scale, int64_t threads) {                                               \
        const int64_t row = kv_heads * group * head_dim;                                                        \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)")                       \
        for (int64_t t = 0; t < n_tasks; t++)                                                                   \
            for (int64_t h = 0; h < kv_heads; h++) {                                                            \
                const int64_t first_row = tasks[4 * t], tokens = tasks[4 * t + 1], position = tasks[4 * t + 3]; \
                const int64_t *table = tables + tasks[4 * t + 2] * max_blocks;                                  \
                if (tokens == 1)                                                                                \
                    ONE_TOKEN(PREFIX, head_dim)(q + first_row * q_stride, pool, table, position + 1,            \
                                                out + first_row * row, kv_heads, h, group, head_dim,            \
                                                block_size, scale);                                             \
                else                                                                                            \
                    TILE(q + first_row * q_stride, q_stride, pool, table, position, tokens, out + first_row * row, \
                         row, kv_heads, h, group, head_dim, block_size, scale);                                 \
            }                                                                                                   \
    }

DEFINE_ENTRY(paged_attention_f32, float, f32, f32_tile_f32)
DEFINE_ENTRY(paged_attention_bf16, uint16_t, bf16, BF16_TILE)

/* The limits the caller checks before calling, how bf16 tiles multiply, and the floats in a tile's vectors. */
int64_t paged_attention_max_group(void) { return MAX_GROUP; }
int64_t paged_attention_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_attention_max_block_size(void) { return MAX_BLOCK_SIZE; }
int64_t paged_attention_head_dim_multiple(void) { return HEAD_DIM_MULTIPLE; }
int64_t paged_attention_tile_rows(void) { return TILE_ROWS; }
int64_t paged_attention_bf16_dot_products(void) { return BF16_DOT_PRODUCTS; }
int64_t paged_attention_vector_width(void) { return VL; }
