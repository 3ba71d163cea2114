/* Attention of many query rows over many key ranges of one layer's KV store, in one call.

   The unit of work is a task: a block of query rows that attend to the same contiguous
   range of slots (the caller picks at most MAX_QUERIES_PER_TASK / G rows), for one kv head
   or all of them. Every key the task reads serves all its rows' queries (G query heads per
   kv head), so a prefix shared by many rows is read once per block rather than once per
   row. Two ways to compute a task, same arithmetic contract:
   - `run_task_lanes` (more than QUERY_BLOCK queries: prefill chunks, shared prefixes): the
     queries in the vector lanes, a key's scores for 16 queries one vector accumulated over
     d, the online softmax lane-wise;
   - `run_task` (a decode row's few heads): each key's dot products directly.
   Each (task, row) pair is an "entry": its result over the range (out, log-sum-exp) goes
   straight to the row's output when the row has no other entry, else to a scratch slot
   that a second pass merges exactly by log-sum-exp:

       lse = log Σᵢ exp(lseᵢ)        out = Σᵢ exp(lseᵢ − lse) · outᵢ

   A lanes task may chain further key ranges that the same block of rows sees (a prefill
   chunk's ancestors and its own keys): one online softmax over all of them, the queries
   loaded once, and the rows' outputs written whole — nothing to merge.

   Before the tasks, the call can store the step's own keys and values at their slots (rotated
   by rope when it is given the angles; queries are then rotated as they are loaded), so one
   call does a layer's rope, KV write and attention.

   A row sees the first `visible[entry]` keys of its task's range (causal masking, and keys
   split across tasks). Scores, softmax and accumulation are fp32; an entry that sees no key
   weighs nothing, and a row with no visible key gets out = 0, lse = -inf.

   Both passes are loops over independent items (tasks, then rows) on the library's pool
   (pool.c), so every row's arithmetic is the same whichever thread runs it.

   Layouts (fp32, innermost dimension contiguous):
     q      [T, H, D], row stride q_row_stride (floats), head stride D
     keys   [capacity, Hkv, D], contiguous; values likewise
     out    [T, H, D] contiguous; lse [T, H]
     part_out [E, H, D] scratch; part_lse [E, H] scratch (E entries)
*/

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"
#include "prefixbatch_kernels.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#else
/* Without AVX-512 each 16-lane vector below is split into narrower registers, and GCC's -O3-only
   passes (RTL PRE, load CSE after reload) then took ~38 s on this file, against ~5 s at -O2
   (GCC 12, x86-64-v2/v3); see docs/kernels.md for what each build flavour runs. */
#pragma GCC optimize("O2")
#endif

#define TASK_COLUMNS 6 /* key_start, num_keys, entry0, num_rows, kv head or -1, next range or -1 */
#define MAX_QUERIES_PER_TASK 128 /* rows per task × G: the caller picks the rows */
#define MAX_HEAD_DIM 256
#define QUERY_BLOCK 4
#define HEAD_GROUP 8 /* `run_task`: kv heads a pass over the keys serves */
#define TILE_VECS 4 /* `run_task`: 16-key vectors a tile */
#define TILE_KEYS (TILE_VECS * LANES)
#define DOT_MAX_QUERIES QUERY_BLOCK /* up to this many queries a task: `run_task` (dot products) */
#define LANES_MIN_QUERIES (DOT_MAX_QUERIES + 1) /* from this many queries a task, `run_task_lanes` */
#define LANE_TILE_KEYS 64 /* keys a lanes task scores at a time */
#define QUERY_VECS (MAX_QUERIES_PER_TASK / 16) /* query vectors of a lanes task, at most */
#define PV_ACCUMULATORS 24 /* `run_task_lanes`' output pass: queries × D/16 vectors in registers */
#define LANES_QUERIES (QUERY_VECS * LANES + PV_ACCUMULATORS) /* with the last block's padding */

/* 16 fp32 lanes: one AVX-512 register (two AVX2 ones, where that is what the CPU has). */
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
#define LANES 16

/* The store's element, `kv_t`: fp32, or bf16 where this file is built as span_attention_bf16.c
   (a bf16 model's keys and values: half the bytes to read; every sum still fp32). `kv_load`
   widens 16 of them to fp32 lanes, `kv_round` narrows one fp32 value as PyTorch rounds it. */
#ifdef PB_KV_BF16
typedef uint16_t kv_t;
#define SPAN_ATTENTION pb_span_attention_bf16
static inline vf16 kv_load(const kv_t *p) {
    vh16 h;
    memcpy(&h, p, sizeof h);
    return (vf16)(__builtin_convertvector(h, vu16) << 16);
}
static inline float kv_scalar(kv_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline kv_t kv_round(float f) { /* to nearest even (finite values) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (kv_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#else
typedef float kv_t;
#define SPAN_ATTENTION pb_span_attention
static inline vf16 kv_load(const kv_t *p) {
    vf16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline float kv_scalar(kv_t x) { return x; }
static inline kv_t kv_round(float f) { return f; }
#endif


static inline vf16 splat(float x) { return (vf16){0} + x; }

/* Lane-wise: a where mask, else b. */
static inline vf16 select(vi16 mask, vf16 a, vf16 b) { return (vf16)(((vi16)a & mask) | ((vi16)b & ~mask)); }

#if defined(__AVX512F__)
/* One instruction (a compare and a select are two dependent ones, on a running max's chain). */
static inline vf16 vmax(vf16 a, vf16 b) { return (vf16)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline vf16 vmax(vf16 a, vf16 b) { return select(a > b, a, b); }
#endif


/* Loaded once, used many times: without this, GCC folds the load into every multiply-add that
   uses the value (one load per FMA, more than the load ports serve). Not for long rows, which
   would not fit the registers beside the accumulators. */
static inline __attribute__((always_inline)) void keep_in_register(vf16 *x, const int chunks) {
#if defined(__AVX512F__) /* "v": one zmm register; narrower builds have none that holds 16 lanes */
    if (chunks <= 8) __asm__("" : "+v"(*x));
#else
    (void)x, (void)chunks;
#endif
}

/* exp of x <= 0 in every lane (scores minus their running max): 2^n · e^f, |f| <= ln2 / 2,
   e^f by its Taylor series to degree 6 (relative error < 1.3e-7 there: fp32's own). */
static inline vf16 exp_nonpositive(vf16 x) {
    x = vmax(x, splat(-87.0f));
    const vf16 t = x * 1.44269504088896341f; /* x / ln 2, <= 0 */
    const vi16 n = -__builtin_convertvector(0.5f - t, vi16); /* round(t) for t <= 0 */
    const vf16 f = (t - __builtin_convertvector(n, vf16)) * 0.693147180559945309f;
    vf16 p = splat(1.0f / 720.0f);
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return p * (vf16)((n + 127) << 23);
}

static inline float exp_nonpositive1(float x) { return exp_nonpositive(splat(x))[0]; }

static inline float max_of(vf16 x) {
    const vi16 r8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const vi16 r4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const vi16 r2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const vi16 r1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    vf16 y = __builtin_shuffle(x, r8);
    x = vmax(x, y);
    y = __builtin_shuffle(x, r4);
    x = vmax(x, y);
    y = __builtin_shuffle(x, r2);
    x = vmax(x, y);
    y = __builtin_shuffle(x, r1);
    x = vmax(x, y);
    return x[0];
}

static inline float sum_of(vf16 x) {
    const vi16 r8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const vi16 r4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const vi16 r2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const vi16 r1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    x += __builtin_shuffle(x, r8);
    x += __builtin_shuffle(x, r4);
    x += __builtin_shuffle(x, r2);
    x += __builtin_shuffle(x, r1);
    return x[0];
}

/* Lane j of the result: the sum of the lanes of v[j]. Four levels, each adding the halves of
   pairs of vectors side by side: 30 shuffles and 15 adds for 16 sums. */
static inline vf16 sums_of16(const vf16 v[LANES]) {
    const vi16 a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi16 b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi16 a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi16 b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vi16 a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vi16 b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vi16 a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vi16 b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vf16 w[8], u[4], z[2];
    for (int i = 0; i < 8; i++)
        w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], a1) + __builtin_shuffle(v[2 * i], v[2 * i + 1], b1);
    for (int i = 0; i < 4; i++)
        u[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], a2) + __builtin_shuffle(w[2 * i], w[2 * i + 1], b2);
    for (int i = 0; i < 2; i++)
        z[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], a3) + __builtin_shuffle(u[2 * i], u[2 * i + 1], b3);
    return __builtin_shuffle(z[0], z[1], a4) + __builtin_shuffle(z[0], z[1], b4);
}

/* In place: v[j][i] becomes the old v[i][j]. Four rounds, each swapping the off-diagonal s × s
   sub-blocks of every 2s × 2s block (s = 8, 4, 2, 1): 64 two-vector shuffles. */
static inline __attribute__((always_inline)) void transpose16(vf16 v[LANES]) {
    for (int s = LANES / 2; s > 0; s /= 2) {
        vi16 low, high; /* rows i and i + s: columns with bit s clear from i, set from i + s */
        for (int j = 0; j < LANES; j++) {
            low[j] = (j & s) ? LANES + j - s : j;
            high[j] = (j & s) ? LANES + j : j + s;
        }
        for (int i = 0; i < LANES; i++) {
            if (i & s) continue;
            const vf16 a = v[i], b = v[i + s];
            v[i] = __builtin_shuffle(a, b, low);
            v[i + s] = __builtin_shuffle(a, b, high);
        }
    }
}

/* What every task of one call shares. */
typedef struct {
    const int64_t *tasks; /* [*, TASK_COLUMNS]: the rows `run_task_lanes` chains through */
    const float *q;
    int64_t q_row_stride;
    const float *cos, *sin; /* [T, D/2] each: q is rotated on load (rope); NULL: q is as given */
    const kv_t *keys, *values;
    int num_heads, num_kv_heads;
    float scale;
    const int64_t *entry_row, *entry_visible, *row_ptr;
    float *part_out, *part_lse; /* entries of rows with several */
    float *out, *lse;           /* rows: written here directly when a row has one entry */
} Call;

/* Query row `row`, query head `h`, times the scale, into dst[head_dim]: rotated first when the
   call has angles (rope's "rotate half" form: dimension i pairs with i + D/2). */
static inline __attribute__((always_inline)) void load_query(const Call *call, const int head_dim, int64_t row, int h, float *dst) {
    const float *x = call->q + row * call->q_row_stride + (int64_t)h * head_dim;
    const float scale = call->scale;
    if (call->cos == NULL) {
        for (int d = 0; d < head_dim; d++) dst[d] = x[d] * scale;
        return;
    }
    const int half = head_dim / 2;
    const float *c = call->cos + row * half, *s = call->sin + row * half;
    for (int i = 0; i < half; i++) {
        dst[i] = (x[i] * c[i] - x[i + half] * s[i]) * scale;
        dst[i + half] = (x[i + half] * c[i] + x[i] * s[i]) * scale;
    }
}

/* A task's outputs: each entry's normalised output and log-sum-exp, straight into the row's
   output when the row has no other entry (nothing to merge), else into the entry's slot. */
static inline __attribute__((always_inline)) void write_results(
    const Call *call, const int head_dim, int64_t entry0, int num_rows, int head,
    vf16 acc[][MAX_HEAD_DIM / LANES], const float *run_max, const float *run_sum) {
    const int num_heads = call->num_heads, group = num_heads / call->num_kv_heads;
    const int chunks = head_dim / LANES;
    for (int r = 0; r < num_rows; r++) {
        const int64_t entry = entry0 + r, row = call->entry_row[entry];
        const int direct = call->row_ptr[row + 1] - call->row_ptr[row] == 1; /* nothing to merge */
        float *out = direct ? call->out + row * num_heads * head_dim : call->part_out + entry * num_heads * head_dim;
        float *lse = direct ? call->lse + row * num_heads : call->part_lse + entry * num_heads;
        for (int g = 0; g < group; g++) {
            const int qi = r * group + g;
            const int h = head * group + g;
            float *o = out + h * head_dim;
            if (run_sum[qi] > 0.0f) {
                const float inv = 1.0f / run_sum[qi];
                for (int c = 0; c < chunks; c++) {
                    const vf16 x = acc[qi][c] * inv;
                    memcpy(o + c * LANES, &x, sizeof x);
                }
                lse[h] = run_max[qi] + logf(run_sum[qi]);
            } else {
                memset(o, 0, sizeof(float) * head_dim);
                lse[h] = -INFINITY;
            }
        }
    }
}

/* Keys and values of a task's keys [first, first + count) that lie before `stop` (slots from
   key_start; one head's D floats of each) toward the cache, while the caller computes on
   earlier ones: the store is read once a step, cold, and a head's keys are D floats every
   Hkv·D, a stride the hardware prefetcher follows late. */
static inline void prefetch_slots(
    const Call *call, const int head_dim, int64_t key_start, int64_t first, int count, int64_t stop, int head) {
    const int64_t key_stride = (int64_t)call->num_kv_heads * head_dim;
    for (int64_t key = first; key < first + count && key < stop; key++) {
        const char *k = (const char *)(call->keys + (key_start + key) * key_stride + (int64_t)head * head_dim);
        const char *v = (const char *)(call->values + (key_start + key) * key_stride + (int64_t)head * head_dim);
        for (int64_t b = 0; b < (int64_t)sizeof(kv_t) * head_dim; b += 64) {
            __builtin_prefetch(k + b, 0, 3);
            __builtin_prefetch(v + b, 0, 3);
        }
    }
}

/* a[b] += Σ_j probs[b][j] · v_j for the first nq queries: each value row loaded once for them. */
static inline __attribute__((always_inline)) void accumulate_values(
    const kv_t *v_tile, int64_t key_stride, int keys, const int chunks, float probs[][TILE_KEYS],
    vf16 a[][MAX_HEAD_DIM / LANES], const int nq) {
    for (int j = 0; j < keys; j++) {
        const kv_t *v = v_tile + j * key_stride;
        for (int c = 0; c < chunks; c++) {
            const vf16 vc = kv_load(v + c * LANES);
            for (int b = 0; b < nq; b++) a[b][c] += probs[b][j] * vc;
        }
    }
}

/* One task of few queries per kv head (at most DOT_MAX_QUERIES: a decode row, its G heads):
   rows [entry0, entry0 + num_rows) of the entry list, kv heads [head_first, head_first +
   head_count), keys [key_start, key_start + num_keys). Writes its entries' results
   (`write_results`).

   Keys go by tiles of TILE_KEYS, and within a tile by kv head, up to HEAD_GROUP heads at a
   time: a slot's heads lie side by side, so the tile's slots are read whole and in order
   rather than once per head at a stride. For each head: each key's dot products with its
   few queries directly, 16 keys' partial sums reduced together (`sums_of16`); then the
   online softmax per query, and the outputs updated with the tile's values, each value row
   loaded once for the queries. Always inlined into callers with a constant head_dim (a
   multiple of LANES), so the loops over d unroll fully. */
static inline __attribute__((always_inline)) void run_task(
    const Call *call, const int head_dim, int64_t key_start, int64_t num_keys, int64_t entry0,
    int num_rows, int head_first, int head_count) {
    const kv_t *keys = call->keys, *values = call->values;
    const int num_heads = call->num_heads, num_kv_heads = call->num_kv_heads;
    const int64_t *entry_row = call->entry_row, *entry_visible = call->entry_visible;
    const int group = num_heads / num_kv_heads;
    const int num_queries = num_rows * group; /* per kv head, at most QUERY_BLOCK */
    const int chunks = head_dim / LANES;
    const int64_t key_stride = (int64_t)num_kv_heads * head_dim;
    float qs[HEAD_GROUP][QUERY_BLOCK][MAX_HEAD_DIM] __attribute__((aligned(64)));
    vf16 acc[HEAD_GROUP][QUERY_BLOCK][MAX_HEAD_DIM / LANES];
    float probs[QUERY_BLOCK][TILE_KEYS] __attribute__((aligned(64)));
    float run_max[HEAD_GROUP][QUERY_BLOCK], run_sum[HEAD_GROUP][QUERY_BLOCK];
    int64_t visible[QUERY_BLOCK];
    int64_t most_visible = 0;
    vi16 lane;
    for (int j = 0; j < LANES; j++) lane[j] = j;

    for (int qi = 0; qi < QUERY_BLOCK; qi++) visible[qi] = 0; /* padding: sees no key */
    for (int r = 0; r < num_rows; r++) {
        const int64_t seen = entry_visible[entry0 + r] < num_keys ? entry_visible[entry0 + r] : num_keys;
        most_visible = seen > most_visible ? seen : most_visible;
        for (int g = 0; g < group; g++) visible[r * group + g] = seen;
    }

    for (int h0 = 0; h0 < head_count; h0 += HEAD_GROUP) {
        const int heads = head_count - h0 < HEAD_GROUP ? head_count - h0 : HEAD_GROUP;
        for (int hh = 0; hh < heads; hh++) {
            const int head = head_first + h0 + hh;
            for (int qi = 0; qi < QUERY_BLOCK; qi++) {
                if (qi < num_queries)
                    load_query(call, head_dim, entry_row[entry0 + qi / group], head * group + qi % group, qs[hh][qi]);
                else
                    for (int d = 0; d < head_dim; d++) qs[hh][qi][d] = 0.0f;
                for (int c = 0; c < chunks; c++) acc[hh][qi][c] = splat(0.0f);
                run_max[hh][qi] = -FLT_MAX;
                run_sum[hh][qi] = 0.0f;
            }
        }

        for (int64_t tile = 0; tile < most_visible; tile += TILE_KEYS) {
            const int tile_keys = (int)(most_visible - tile < TILE_KEYS ? most_visible - tile : TILE_KEYS);
            for (int hh = 0; hh < heads; hh++) {
                const int head = head_first + h0 + hh;
                /* the next head's part of this tile, while this head's is computed */
                if (hh + 1 < heads) prefetch_slots(call, head_dim, key_start, tile, tile_keys, most_visible, head + 1);
                const kv_t *k_tile = keys + (key_start + tile) * key_stride + (int64_t)head * head_dim;
                const kv_t *v_tile = values + (key_start + tile) * key_stride + (int64_t)head * head_dim;
                vf16 s[QUERY_BLOCK][TILE_VECS];
                for (int t = 0; t < TILE_VECS; t++) {
                    for (int b = 0; b < QUERY_BLOCK; b++) s[b][t] = splat(0.0f);
                    /* the next tile's keys, 16 at a time */
                    prefetch_slots(call, head_dim, key_start, tile + TILE_KEYS + t * LANES, LANES, most_visible, head);
                    if (t * LANES >= tile_keys) continue; /* past the range: masked below */
                    vf16 products[QUERY_BLOCK][LANES];
                    for (int j = 0; j < LANES; j++) {
                        const int key = t * LANES + j;
                        vf16 kc[MAX_HEAD_DIM / LANES];
                        for (int c = 0; c < chunks; c++) kc[c] = splat(0.0f);
                        if (key < tile_keys)
                            for (int c = 0; c < chunks; c++) kc[c] = kv_load(k_tile + key * key_stride + c * LANES);
                        for (int b = 0; b < num_queries; b++) {
                            vf16 x = splat(0.0f);
                            for (int c = 0; c < chunks; c++) {
                                vf16 qc;
                                memcpy(&qc, &qs[hh][b][c * LANES], sizeof qc);
                                x += qc * kc[c];
                            }
                            products[b][j] = x;
                        }
                    }
                    for (int b = 0; b < num_queries; b++) s[b][t] = sums_of16(products[b]);
                }
                int block_live = 0;
                float correction[QUERY_BLOCK];
                for (int b = 0; b < QUERY_BLOCK; b++) {
                    const int64_t seen = visible[b] - tile;
                    const int live = (int)(seen < 0 ? 0 : seen < tile_keys ? seen : tile_keys);
                    block_live = live > block_live ? live : block_live;
                    correction[b] = 1.0f;
                    if (live == 0) {
                        for (int j = 0; j < TILE_KEYS; j++) probs[b][j] = 0.0f;
                        continue;
                    }
                    vf16 top = splat(-FLT_MAX), total = splat(0.0f);
                    if (live == TILE_KEYS) { /* the common case: every key of the tile seen */
                        for (int t = 0; t < TILE_VECS; t++) top = vmax(top, s[b][t]);
                    } else {
                        for (int t = 0; t < TILE_VECS; t++) {
                            s[b][t] = select(lane + t * LANES >= live, splat(-FLT_MAX), s[b][t]);
                            top = vmax(top, s[b][t]);
                        }
                    }
                    const float tile_max = max_of(top);
                    const float old_max = run_max[hh][b];
                    const float new_max = tile_max > old_max ? tile_max : old_max;
                    correction[b] = new_max == old_max ? 1.0f : exp_nonpositive1(old_max - new_max);
                    for (int t = 0; t < TILE_VECS; t++) {
                        vf16 p = exp_nonpositive(s[b][t] - new_max);
                        if (live < TILE_KEYS) p = select(lane + t * LANES >= live, splat(0.0f), p);
                        total += p;
                        memcpy(&probs[b][t * LANES], &p, sizeof p);
                    }
                    run_sum[hh][b] = run_sum[hh][b] * correction[b] + sum_of(total);
                    run_max[hh][b] = new_max;
                }
                if (block_live == 0) continue;
                vf16 a[QUERY_BLOCK][MAX_HEAD_DIM / LANES];
                for (int b = 0; b < QUERY_BLOCK; b++)
                    for (int c = 0; c < chunks; c++) a[b][c] = acc[hh][b][c] * correction[b];
                if (num_queries <= 2)
                    accumulate_values(v_tile, key_stride, block_live, chunks, probs, a, 2);
                else
                    accumulate_values(v_tile, key_stride, block_live, chunks, probs, a, QUERY_BLOCK);
                for (int b = 0; b < QUERY_BLOCK; b++)
                    for (int c = 0; c < chunks; c++) acc[hh][b][c] = a[b][c];
            }
        }

        for (int hh = 0; hh < heads; hh++)
            write_results(call, head_dim, entry0, num_rows, head_first + h0 + hh, acc[hh], run_max[hh], run_sum[hh]);
    }
}

/* Scores of kb keys (rows k_rows) for `nv` query vectors from v0: kb × nv accumulators over
   d; inlined with kb, nv and head_dim constant, so they stay in registers. Stores the first `keys`. */
static inline __attribute__((always_inline)) void score_block(
    const kv_t *const k_rows[8], const vf16 q_t[][QUERY_VECS], int v0, const int kb, const int nv,
    const int head_dim, int keys, vf16 out[][QUERY_VECS]) {
    vf16 sc[8][4];
    for (int i = 0; i < kb; i++)
        for (int v = 0; v < nv; v++) sc[i][v] = splat(0.0f);
    for (int d = 0; d < head_dim; d++)
        for (int i = 0; i < kb; i++) {
            const float x = kv_scalar(k_rows[i][d]);
            for (int v = 0; v < nv; v++) sc[i][v] += x * q_t[d][v0 + v];
        }
    for (int i = 0; i < kb && i < keys; i++)
        for (int v = 0; v < nv; v++) out[i][v0 + v] = sc[i][v];
}

/* Query vector v of a lanes task (its queries v·16 … v·16 + 15, rotated and scaled; zeros past
   the last) into q_t[d][v]: the 16 rows, then 16 × 16 transposes. Not inlined: its buffers
   would crowd the scoring loops' frame. */
static __attribute__((noinline)) void load_query_vector(
    const Call *call, const int head_dim, int64_t entry0, int num_queries, int head, int v,
    vf16 q_t[][QUERY_VECS]) {
    const int group = call->num_heads / call->num_kv_heads;
    float rows[LANES][MAX_HEAD_DIM] __attribute__((aligned(64)));
    for (int l = 0; l < LANES; l++) {
        const int qi = v * LANES + l;
        if (qi < num_queries)
            load_query(call, head_dim, call->entry_row[entry0 + qi / group], head * group + qi % group, rows[l]);
        else /* padding of the last vector: a query that sees no key */
            memset(rows[l], 0, sizeof(float) * head_dim);
    }
    for (int c = 0; c < head_dim / LANES; c++) {
        vf16 block[LANES];
        for (int l = 0; l < LANES; l++) memcpy(&block[l], &rows[l][c * LANES], sizeof block[l]);
        transpose16(block);
        for (int d = 0; d < LANES; d++) q_t[c * LANES + d][v] = block[d];
    }
}

/* A task of many queries (LANES_MIN_QUERIES or more): the same results as `run_task`,
   computed with the queries in the vector lanes. The task's queries are transposed once
   ([D][queries / LANES] vectors); a key's score for 16 queries is then one vector
   accumulated over d from its broadcast components, and the running max, the rescaling and
   the exps are lane-wise: no key transposition, no horizontal max or sum per query. */
static inline __attribute__((always_inline)) void run_task_lanes(
    const Call *call, const int head_dim, const int64_t *task, int head) {
    const int64_t entry0 = task[2];
    const int num_rows = (int)task[3];
    const int num_kv_heads = call->num_kv_heads, group = call->num_heads / num_kv_heads;
    const int num_queries = num_rows * group;
    const int qvecs = (num_queries + LANES - 1) / LANES;
    const int chunks = head_dim / LANES;
    const int64_t key_stride = (int64_t)num_kv_heads * head_dim;
    vf16 q_t[MAX_HEAD_DIM][QUERY_VECS];
    vf16 acc[LANES_QUERIES][MAX_HEAD_DIM / LANES];
    vf16 scores[LANE_TILE_KEYS][QUERY_VECS];
    /* Columns past the last query vector: computed with (zeros), never written out, by the
       output pass's last block. */
    float probs[LANE_TILE_KEYS][LANES_QUERIES] __attribute__((aligned(64)));
    float correction[LANES_QUERIES] __attribute__((aligned(64)));
    float run_max[QUERY_VECS * LANES], run_sum[QUERY_VECS * LANES];
    vi16 visible[QUERY_VECS];
    vf16 top[QUERY_VECS], total[QUERY_VECS];

    for (int v = 0; v < qvecs; v++) {
        top[v] = splat(-FLT_MAX);
        total[v] = splat(0.0f);
    }
    for (int v = 0; v < qvecs; v++) load_query_vector(call, head_dim, entry0, num_queries, head, v, q_t);
    /* The output pass takes pv_block queries at a time: pv_block × chunks accumulators and the
       value row's chunks stay in registers (each value loaded once per block). */
    const int pv_block = PV_ACCUMULATORS / chunks > 0 ? PV_ACCUMULATORS / chunks : 1;
    for (int qi = 0; qi < qvecs * LANES + pv_block; qi++) {
        for (int c = 0; c < chunks; c++) acc[qi][c] = splat(0.0f);
        correction[qi] = 1.0f;
    }
    for (int k = 0; k < LANE_TILE_KEYS; k++)
        for (int qi = qvecs * LANES; qi < qvecs * LANES + pv_block; qi++) probs[k][qi] = 0.0f;

    /* The task's key range, then each range chained to it (the same rows' other spans): one
       online softmax over all of them, so the rows' outputs need no merge. */
    for (const int64_t *range = task; range != NULL;
         range = range[5] < 0 ? NULL : call->tasks + range[5] * TASK_COLUMNS) {
        const int64_t key_start = range[0], num_keys = range[1], visible0 = range[2];
        int64_t most_visible = 0, least_visible = num_keys;
        for (int v = 0; v < qvecs; v++) visible[v] = (vi16){0};
        for (int r = 0; r < num_rows; r++) {
            const int64_t seen = call->entry_visible[visible0 + r] < num_keys ? call->entry_visible[visible0 + r] : num_keys;
            most_visible = seen > most_visible ? seen : most_visible;
            least_visible = seen < least_visible ? seen : least_visible;
            for (int g = 0; g < group; g++) visible[(r * group + g) / LANES][(r * group + g) % LANES] = (int32_t)seen;
        }
        for (int64_t tile = 0; tile < most_visible; tile += LANE_TILE_KEYS) {
            const int tile_keys = (int)(most_visible - tile < LANE_TILE_KEYS ? most_visible - tile : LANE_TILE_KEYS);
            const kv_t *k_tile = call->keys + (key_start + tile) * key_stride + (int64_t)head * head_dim;
            const kv_t *v_tile = call->values + (key_start + tile) * key_stride + (int64_t)head * head_dim;
            /* Scores, kb keys × up to 4 query vectors at a time: 8 keys when there are 1–2 vectors,
               4 keys × 4 vectors otherwise (at least 8 independent accumulators). */
            const int kb = qvecs <= 2 ? 8 : 4;
            for (int k0 = 0; k0 < tile_keys; k0 += kb) {
                /* the next tile's keys, kb at a time */
                prefetch_slots(call, head_dim, key_start, tile + LANE_TILE_KEYS + k0, kb, most_visible, head);
                const kv_t *k_rows[8];
                for (int i = 0; i < kb; i++) /* past the range: the last key again, never seen */
                    k_rows[i] = k_tile + (k0 + i < tile_keys ? k0 + i : tile_keys - 1) * key_stride;
                if (qvecs == 1)
                    score_block(k_rows, q_t, 0, 8, 1, head_dim, tile_keys - k0, &scores[k0]);
                else if (qvecs == 2)
                    score_block(k_rows, q_t, 0, 8, 2, head_dim, tile_keys - k0, &scores[k0]);
                else
                    for (int v0 = 0; v0 < qvecs; v0 += 4) {
                        const int nv = qvecs - v0 < 4 ? qvecs - v0 : 4;
                        if (nv == 4)
                            score_block(k_rows, q_t, v0, 4, 4, head_dim, tile_keys - k0, &scores[k0]);
                        else if (nv == 2)
                            score_block(k_rows, q_t, v0, 4, 2, head_dim, tile_keys - k0, &scores[k0]);
                        else if (nv == 1)
                            score_block(k_rows, q_t, v0, 4, 1, head_dim, tile_keys - k0, &scores[k0]);
                        else
                            score_block(k_rows, q_t, v0, 4, 3, head_dim, tile_keys - k0, &scores[k0]);
                    }
            }
            /* Online softmax, lane-wise; keys a query may not see weigh exactly 0. */
            const int masked = tile + tile_keys > least_visible;
            for (int v = 0; v < qvecs; v++) {
                vf16 tops[4] = {splat(-FLT_MAX), splat(-FLT_MAX), splat(-FLT_MAX), splat(-FLT_MAX)};
                for (int k = 0; k < tile_keys; k++) { /* four running maxima: no chain through every key */
                    if (masked) scores[k][v] = select((vi16){0} + (int32_t)(tile + k) >= visible[v], splat(-FLT_MAX), scores[k][v]);
                    tops[k % 4] = vmax(tops[k % 4], scores[k][v]);
                }
                const vf16 tile_top = vmax(vmax(tops[0], tops[1]), vmax(tops[2], tops[3]));
                const vf16 new_top = vmax(top[v], tile_top);
                const vf16 factor = exp_nonpositive(top[v] - new_top);
                vf16 sum = splat(0.0f);
                for (int k = 0; k < tile_keys; k++) {
                    vf16 p = exp_nonpositive(scores[k][v] - new_top);
                    if (masked) p = select((vi16){0} + (int32_t)(tile + k) >= visible[v], splat(0.0f), p);
                    sum += p;
                    memcpy(&probs[k][v * LANES], &p, sizeof p);
                }
                total[v] = total[v] * factor + sum;
                top[v] = new_top;
                memcpy(&correction[v * LANES], &factor, sizeof factor);
            }
            /* Outputs, pv_block queries at a time, each value row loaded once for them. */
            for (int q0 = 0; q0 < num_queries; q0 += pv_block) {
                vf16 a[PV_ACCUMULATORS + MAX_HEAD_DIM / LANES]; /* [b * chunks + c] */
                for (int b = 0; b < pv_block; b++)
                    for (int c = 0; c < chunks; c++) a[b * chunks + c] = acc[q0 + b][c] * correction[q0 + b];
                for (int k = 0; k < tile_keys; k++) {
                    const kv_t *vrow = v_tile + k * key_stride;
                    vf16 vc[MAX_HEAD_DIM / LANES];
                    for (int c = 0; c < chunks; c++) {
                        vc[c] = kv_load(vrow + c * LANES);
                        keep_in_register(&vc[c], chunks);
                    }
                    for (int b = 0; b < pv_block; b++) {
                        const float p = probs[k][q0 + b];
                        for (int c = 0; c < chunks; c++) a[b * chunks + c] += p * vc[c];
                    }
                }
                for (int b = 0; b < pv_block; b++)
                    for (int c = 0; c < chunks; c++) acc[q0 + b][c] = a[b * chunks + c];
            }
        }
    }

    for (int v = 0; v < qvecs; v++) {
        /* A query that saw no key: total 0, so `write_results` gives out 0, lse -inf. */
        memcpy(&run_max[v * LANES], &top[v], sizeof(vf16));
        memcpy(&run_sum[v * LANES], &total[v], sizeof(vf16));
    }
    write_results(call, head_dim, entry0, num_rows, head, acc, run_max, run_sum);
}

/* A task row: its kv heads [head_first, head_first + head_count); a task of few queries never
   chains (the caller's contract). */
#define RUN_TASK(D)                                                                                  \
    do {                                                                                             \
        if (task[3] * (call->num_heads / call->num_kv_heads) >= LANES_MIN_QUERIES)                   \
            for (int head = head_first; head < head_first + head_count; head++)                      \
                run_task_lanes(call, D, task, head);                                                 \
        else                                                                                         \
            run_task(call, D, task[0], task[1], task[2], (int)task[3], head_first, head_count);      \
    } while (0)

static void run_task_64(const Call *call, const int64_t *task, int head_first, int head_count) {
    RUN_TASK(64);
}

static void run_task_128(const Call *call, const int64_t *task, int head_first, int head_count) {
    RUN_TASK(128);
}

static void run_task_any(const Call *call, int head_dim, const int64_t *task, int head_first, int head_count) {
    RUN_TASK(head_dim);
}

#ifndef PB_KV_BF16
int pb_span_attention_limits(int *max_queries_per_task, int *max_head_dim, int *dot_max_queries) {
    *max_queries_per_task = MAX_QUERIES_PER_TASK;
    *max_head_dim = MAX_HEAD_DIM;
    *dot_max_queries = DOT_MAX_QUERIES;
    return 0;
}
#endif

/* The step's own keys and values into the store: row t's k (rotated when there are angles)
   and v at slot slots[t]. Heads of a row are D apart; rows k_row_stride / v_row_stride. */
static void store_new(
    kv_t *keys, kv_t *values, int num_kv_heads, const int head_dim, const float *k_new, int64_t k_row_stride,
    const float *v_new, int64_t v_row_stride, const int64_t *slots, int64_t t, const float *cos, const float *sin) {
    const int64_t slot_stride = (int64_t)num_kv_heads * head_dim;
    kv_t *kd = keys + slots[t] * slot_stride, *vd = values + slots[t] * slot_stride;
    const float *ks = k_new + t * k_row_stride, *vs = v_new + t * v_row_stride;
    for (int64_t i = 0; i < slot_stride; i++) vd[i] = kv_round(vs[i]);
    if (cos == NULL) {
        for (int64_t i = 0; i < slot_stride; i++) kd[i] = kv_round(ks[i]);
        return;
    }
    const int half = head_dim / 2;
    const float *c = cos + t * half, *s = sin + t * half;
    for (int h = 0; h < num_kv_heads; h++, kd += head_dim, ks += head_dim)
        for (int i = 0; i < half; i++) {
            kd[i] = kv_round(ks[i] * c[i] - ks[i + half] * s[i]);
            kd[i + half] = kv_round(ks[i + half] * c[i] + ks[i] * s[i]);
        }
}

/* The three loops of a call, as pool tasks over one call's arguments. */
typedef struct {
    const Call *call;
    kv_t *keys, *values;
    int num_kv_heads, head_dim, group;
    const float *k_new;
    int64_t k_row_stride;
    const float *v_new;
    int64_t v_row_stride;
    const int64_t *slots;
    int64_t num_new;
    const float *cos, *sin;
    const int64_t *tasks;
    int num_rows_out;
    const int64_t *row_entries;
} Loops;

#define ROWS_A_TASK 16 /* rows a task of the store and merge loops */
#define STORE_PARALLEL_FROM 256 /* new rows: fewer are stored by the caller alone */

static void store_rows(void *ctx, int64_t task) {
    const Loops *l = ctx;
    const int64_t stop = (task + 1) * ROWS_A_TASK < l->num_new ? (task + 1) * ROWS_A_TASK : l->num_new;
    for (int64_t t = task * ROWS_A_TASK; t < stop; t++)
        store_new(l->keys, l->values, l->num_kv_heads, l->head_dim, l->k_new, l->k_row_stride, l->v_new,
                  l->v_row_stride, l->slots, t, l->cos, l->sin);
}

static void run_one_task(void *ctx, int64_t i) {
    const Loops *l = ctx;
    const int64_t *task = l->tasks + i * TASK_COLUMNS;
    if (task[3] * l->group > MAX_QUERIES_PER_TASK) return; /* the caller never builds one */
    const int first = task[4] < 0 ? 0 : (int)task[4];
    const int count = task[4] < 0 ? l->num_kv_heads : 1;
    if (l->head_dim == 64)
        run_task_64(l->call, task, first, count);
    else if (l->head_dim == 128)
        run_task_128(l->call, task, first, count);
    else
        run_task_any(l->call, l->head_dim, task, first, count);
}

/* Rows with more than one entry: their entries' results merged by log-sum-exp. */
static void merge_rows(void *ctx, int64_t task) {
    const Loops *l = ctx;
    const Call *call = l->call;
    const int num_heads = call->num_heads, head_dim = l->head_dim;
    const int stop_row = (task + 1) * ROWS_A_TASK < l->num_rows_out ? (int)((task + 1) * ROWS_A_TASK) : l->num_rows_out;
    for (int row = (int)(task * ROWS_A_TASK); row < stop_row; row++) {
        const int64_t first = call->row_ptr[row], stop = call->row_ptr[row + 1];
        if (stop - first == 1) continue; /* written by its task */
        for (int h = 0; h < num_heads; h++) {
            float *o = call->out + ((int64_t)row * num_heads + h) * head_dim;
            float *lse = call->lse + (int64_t)row * num_heads + h;
            float total_max = -INFINITY;
            for (int64_t i = first; i < stop; i++) {
                const float part = call->part_lse[l->row_entries[i] * num_heads + h];
                total_max = part > total_max ? part : total_max;
            }
            memset(o, 0, sizeof(float) * head_dim);
            if (total_max == -INFINITY) {
                *lse = -INFINITY;
                continue;
            }
            float total = 0.0f;
            for (int64_t i = first; i < stop; i++) {
                const int64_t entry = l->row_entries[i];
                const float part = call->part_lse[entry * num_heads + h];
                if (part == -INFINITY) continue;
                const float weight = exp_nonpositive1(part - total_max);
                const float *p = call->part_out + (entry * num_heads + h) * head_dim;
                total += weight;
                for (int d = 0; d < head_dim; d++) o[d] += weight * p[d];
            }
            const float inv = 1.0f / total;
            for (int d = 0; d < head_dim; d++) o[d] *= inv;
            *lse = total_max + logf(total);
        }
    }
}
#ifndef PB_KV_BF16 /* once in the library: the fp32 build's */
int64_t pb_span_args_size(void) { return (int64_t)sizeof(struct pb_span_args); }

int pb_vector_bytes(void) {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX__)
    return 32;
#else
    return 16;
#endif
}
#endif

/* tasks: [num_tasks + chained, TASK_COLUMNS] int64 rows (key_start, num_keys, entry0, num_rows,
   kv head or -1 for all of them, next): the first num_tasks are run; a task of many queries may
   go on with the key range of row `next` (which may go on likewise), the same rows seeing it
   as that row's entries say (entry0 there), its results written for its own entries alone;
   row_entries (CSR by row_ptr [T + 1]) lists, for each output row, its entries (chained
   ranges' entries are not among them).
   num_new > 0: first the step's new keys and values go into the store (`store_new`: k_new,
   v_new [num_new, Hkv, D] rows at slots), before any task reads it. cos, sin [num_new, D/2]
   (or NULL): k_new is not yet rotated, the call applies rope to it; q_cos, q_sin [T, D/2] (or
   NULL) likewise for q (the same arrays when q's rows are the new keys' rows; q may also be
   a subset of them: the rows whose outputs are wanted). */
int SPAN_ATTENTION(const struct pb_span_args *a) {
    const int num_heads = a->num_heads, num_kv_heads = a->num_kv_heads, head_dim = a->head_dim;
    const int group = num_heads / num_kv_heads;
    if (group > MAX_QUERIES_PER_TASK || head_dim > MAX_HEAD_DIM || head_dim % LANES || num_heads % num_kv_heads)
        return 1;
    kv_t *keys = a->keys, *values = a->values;
    const Call call = {a->tasks, a->q, a->q_row_stride, a->q_cos, a->q_sin, keys, values, num_heads,
                       num_kv_heads, a->scale, a->entry_row, a->entry_visible, a->row_ptr, a->part_out,
                       a->part_lse, a->out, a->lse};

    /* Three loops on the pool, each done before the next starts: the new keys and values into
       the store; the tasks (largest first, as the caller orders them); then the rows whose
       entries must be merged. */
    Loops loops = {&call, keys, values, num_kv_heads, head_dim, group, a->k_new, a->k_row_stride, a->v_new,
                   a->v_row_stride, a->slots, a->num_new, a->cos, a->sin, a->tasks, a->num_rows_out, a->row_entries};
    const int64_t num_new = a->num_new, num_rows_out = a->num_rows_out;
    const int num_threads = a->num_threads;
    if (num_new > 0) /* a decode step's few rows: less than waking a thread costs */
        pb_parallel(num_new < STORE_PARALLEL_FROM ? 1 : num_threads, (num_new + ROWS_A_TASK - 1) / ROWS_A_TASK,
                    store_rows, &loops);
    pb_parallel(num_threads, a->num_tasks, run_one_task, &loops);
    int merged = 0;
    for (int64_t row = 0; row < num_rows_out && !merged; row++) merged = a->row_ptr[row + 1] - a->row_ptr[row] != 1;
    if (merged) pb_parallel(num_threads, (num_rows_out + ROWS_A_TASK - 1) / ROWS_A_TASK, merge_rows, &loops);
    return 0;
}
