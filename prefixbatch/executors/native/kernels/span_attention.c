/* Attention of many query rows over many key ranges of one layer's KV store, in one call.

   The unit of work is a task: a block of up to ROW_BLOCK query rows that attend to the same
   contiguous range of slots, for one kv head. Every key the task reads serves all
   ROW_BLOCK · G of its queries (G query heads per kv head), so a prefix shared by many rows
   is read once per block rather than once per row. Each (task, row) pair is an "entry":
   its partial result (out over the range, log-sum-exp) goes to a scratch slot, and a second
   pass merges each row's entries exactly by log-sum-exp:

       lse = log Σᵢ exp(lseᵢ)        out = Σᵢ exp(lseᵢ − lse) · outᵢ

   A row sees the first `visible[entry]` keys of its task's range (causal masking, and keys
   split across tasks). Scores, softmax and accumulation are fp32; an entry that sees no key
   weighs nothing, and a row with no visible key gets out = 0, lse = -inf.

   Both passes are OpenMP loops over independent items (tasks × kv heads, then rows), so
   every row's arithmetic is the same whichever thread runs it and whatever else is in the
   call. The library links the OpenMP runtime PyTorch already loaded (libgomp), so the two
   share one thread pool.

   Layouts (fp32, innermost dimension contiguous):
     q      [T, H, D], row stride q_row_stride (floats), head stride D
     keys   [capacity, Hkv, D], contiguous; values likewise
     out    [T, H, D] contiguous; lse [T, H]
     part_out [E, H/Hkv·Hkv... ] = [E, H, D] scratch; part_lse [E, H] scratch
*/

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROW_BLOCK 8
#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_QUERIES (ROW_BLOCK * MAX_GROUP)

/* 16 fp32 lanes: one AVX-512 register (two AVX2 ones, where that is what the CPU has). */
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
#define LANES 16

static inline vf16 splat(float x) { return (vf16){0} + x; }

/* exp of x <= 0 in every lane (scores minus their running max): 2^n · e^f, |f| <= ln2 / 2,
   e^f by its Taylor series to degree 7 (relative error < 2e-8 there). */
static inline vf16 exp_nonpositive(vf16 x) {
    const vi16 low = x < splat(-87.0f);
    x = (vf16)(((vi16)x & ~low) | ((vi16)splat(-87.0f) & low));
    const vf16 t = x * 1.44269504088896341f; /* x / ln 2, <= 0 */
    const vi16 n = -__builtin_convertvector(0.5f - t, vi16); /* round(t) for t <= 0 */
    const vf16 f = (t - __builtin_convertvector(n, vf16)) * 0.693147180559945309f;
    vf16 p = splat(1.0f / 5040.0f);
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return p * (vf16)((n + 127) << 23);
}

static inline float exp_nonpositive1(float x) { return exp_nonpositive(splat(x))[0]; }

/* One task: rows [entry0, entry0 + num_rows) of the entry list, kv head `head`, keys
   [key_start, key_start + num_keys). Writes part_out / part_lse of its entries.

   Per tile of LANES keys: the tile's keys are transposed once ([D][LANES]), so a query's
   scores for the whole tile are one vector accumulated over d (no horizontal sums), reused
   by all the task's queries; each query's output row is then updated with the tile's
   values, D / LANES vectors at a time. Always inlined into callers with a constant
   head_dim (a multiple of LANES), so those loops unroll fully. */
static inline __attribute__((always_inline)) void run_task(
    const float *q, int64_t q_row_stride, const float *keys, const float *values,
    int num_heads, int num_kv_heads, const int head_dim, float scale,
    int64_t key_start, int64_t num_keys, int64_t entry0, int num_rows, int head,
    const int64_t *entry_row, const int64_t *entry_visible,
    float *part_out, float *part_lse) {
    const int group = num_heads / num_kv_heads;
    const int num_queries = num_rows * group;
    const int chunks = head_dim / LANES;
    const int64_t key_stride = (int64_t)num_kv_heads * head_dim;
    float qs[MAX_QUERIES][MAX_HEAD_DIM] __attribute__((aligned(64)));
    vf16 acc[MAX_QUERIES][MAX_HEAD_DIM / LANES];
    vf16 k_t[MAX_HEAD_DIM];
    float run_max[MAX_QUERIES], run_sum[MAX_QUERIES];
    int64_t visible[MAX_QUERIES];
    int64_t most_visible = 0;
    vi16 lane;
    for (int j = 0; j < LANES; j++) lane[j] = j;

    for (int r = 0; r < num_rows; r++) {
        const int64_t entry = entry0 + r;
        const float *row_q = q + entry_row[entry] * q_row_stride + (int64_t)head * group * head_dim;
        int64_t seen = entry_visible[entry] < num_keys ? entry_visible[entry] : num_keys;
        most_visible = seen > most_visible ? seen : most_visible;
        for (int g = 0; g < group; g++) {
            const int qi = r * group + g;
            for (int d = 0; d < head_dim; d++) qs[qi][d] = row_q[g * head_dim + d] * scale;
            for (int c = 0; c < chunks; c++) acc[qi][c] = splat(0.0f);
            run_max[qi] = -FLT_MAX;
            run_sum[qi] = 0.0f;
            visible[qi] = seen;
        }
    }

    for (int64_t tile = 0; tile < most_visible; tile += LANES) {
        const int tile_keys = (int)(most_visible - tile < LANES ? most_visible - tile : LANES);
        const float *k_tile = keys + (key_start + tile) * key_stride + (int64_t)head * head_dim;
        const float *v_tile = values + (key_start + tile) * key_stride + (int64_t)head * head_dim;
        for (int j = 0; j < tile_keys; j++) {
            const float *k = k_tile + j * key_stride;
            for (int d = 0; d < head_dim; d++) k_t[d][j] = k[d];
        }
        for (int j = tile_keys; j < LANES; j++) /* past the range: never read, never seen */
            for (int d = 0; d < head_dim; d++) k_t[d][j] = 0.0f;
        for (int qi = 0; qi < num_queries; qi++) {
            const int64_t live = visible[qi] - tile < tile_keys ? visible[qi] - tile : tile_keys;
            if (live <= 0) continue;
            vf16 s = splat(0.0f);
            for (int d = 0; d < head_dim; d++) s += qs[qi][d] * k_t[d];
            const vi16 hidden = lane >= (int32_t)live;
            s = (vf16)(((vi16)s & ~hidden) | ((vi16)splat(-FLT_MAX) & hidden));
            float tile_max = s[0];
            for (int j = 1; j < LANES; j++) tile_max = s[j] > tile_max ? s[j] : tile_max;
            const float new_max = tile_max > run_max[qi] ? tile_max : run_max[qi];
            const float correction = exp_nonpositive1(run_max[qi] - new_max);
            vf16 p = (vf16)((vi16)exp_nonpositive(s - new_max) & ~hidden);
            float tile_sum = 0.0f;
            for (int j = 0; j < LANES; j++) tile_sum += p[j];
            run_sum[qi] = run_sum[qi] * correction + tile_sum;
            run_max[qi] = new_max;
            vf16 a[MAX_HEAD_DIM / LANES];
            for (int c = 0; c < chunks; c++) a[c] = acc[qi][c] * correction;
            for (int j = 0; j < live; j++) {
                const float *v = v_tile + j * key_stride;
                for (int c = 0; c < chunks; c++) {
                    vf16 vc;
                    memcpy(&vc, v + c * LANES, sizeof vc);
                    a[c] += p[j] * vc;
                }
            }
            for (int c = 0; c < chunks; c++) acc[qi][c] = a[c];
        }
    }

    for (int r = 0; r < num_rows; r++) {
        const int64_t entry = entry0 + r;
        for (int g = 0; g < group; g++) {
            const int qi = r * group + g;
            const int h = head * group + g;
            float *o = part_out + (entry * num_heads + h) * head_dim;
            if (run_sum[qi] > 0.0f) {
                const float inv = 1.0f / run_sum[qi];
                for (int c = 0; c < chunks; c++) {
                    const vf16 x = acc[qi][c] * inv;
                    memcpy(o + c * LANES, &x, sizeof x);
                }
                part_lse[entry * num_heads + h] = run_max[qi] + logf(run_sum[qi]);
            } else {
                memset(o, 0, sizeof(float) * head_dim);
                part_lse[entry * num_heads + h] = -INFINITY;
            }
        }
    }
}

#define TASK_FOR_HEAD_DIM(D)                                                                  \
    static void run_task_##D(                                                                 \
        const float *q, int64_t q_row_stride, const float *keys, const float *values,         \
        int num_heads, int num_kv_heads, int head_dim, float scale, int64_t key_start,        \
        int64_t num_keys, int64_t entry0, int num_rows, int head, const int64_t *entry_row,   \
        const int64_t *entry_visible, float *part_out, float *part_lse) {                     \
        (void)head_dim;                                                                       \
        run_task(q, q_row_stride, keys, values, num_heads, num_kv_heads, D, scale, key_start, \
                 num_keys, entry0, num_rows, head, entry_row, entry_visible, part_out,        \
                 part_lse);                                                                   \
    }
TASK_FOR_HEAD_DIM(64)
TASK_FOR_HEAD_DIM(128)

static void run_task_any(
    const float *q, int64_t q_row_stride, const float *keys, const float *values,
    int num_heads, int num_kv_heads, int head_dim, float scale, int64_t key_start,
    int64_t num_keys, int64_t entry0, int num_rows, int head, const int64_t *entry_row,
    const int64_t *entry_visible, float *part_out, float *part_lse) {
    run_task(q, q_row_stride, keys, values, num_heads, num_kv_heads, head_dim, scale, key_start,
             num_keys, entry0, num_rows, head, entry_row, entry_visible, part_out, part_lse);
}

int pb_span_attention_limits(int *row_block, int *max_group, int *max_head_dim) {
    *row_block = ROW_BLOCK;
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_HEAD_DIM;
    return 0;
}

/* tasks: [num_tasks, 4] int64 rows (key_start, num_keys, entry0, num_rows); entries sorted so
   that row_entries (CSR by row_ptr [T + 1]) lists, for each output row, its entries. */
int pb_span_attention(
    const float *q, int64_t q_row_stride, const float *keys, const float *values,
    int num_rows_out, int num_heads, int num_kv_heads, int head_dim, float scale,
    int64_t num_tasks, const int64_t *tasks, const int64_t *entry_row, const int64_t *entry_visible,
    const int64_t *row_ptr, const int64_t *row_entries,
    float *part_out, float *part_lse, float *out, float *lse, int num_threads) {
    const int group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || head_dim % LANES || num_heads % num_kv_heads)
        return 1;
    const int64_t work = num_tasks * num_kv_heads;
    void (*task_fn)(const float *, int64_t, const float *, const float *, int, int, int, float,
                    int64_t, int64_t, int64_t, int, int, const int64_t *, const int64_t *,
                    float *, float *) =
        head_dim == 64 ? run_task_64 : head_dim == 128 ? run_task_128 : run_task_any;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < work; item++) {
        const int64_t *task = tasks + (item / num_kv_heads) * 4;
        if (task[3] > ROW_BLOCK) continue; /* the caller never builds such a task */
        task_fn(q, q_row_stride, keys, values, num_heads, num_kv_heads, head_dim, scale,
                task[0], task[1], task[2], (int)task[3], (int)(item % num_kv_heads),
                entry_row, entry_visible, part_out, part_lse);
    }

#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int row = 0; row < num_rows_out; row++) {
        const int64_t first = row_ptr[row], stop = row_ptr[row + 1];
        for (int h = 0; h < num_heads; h++) {
            float *o = out + ((int64_t)row * num_heads + h) * head_dim;
            float total_max = -INFINITY;
            for (int64_t i = first; i < stop; i++) {
                const float part = part_lse[row_entries[i] * num_heads + h];
                total_max = part > total_max ? part : total_max;
            }
            memset(o, 0, sizeof(float) * head_dim);
            if (total_max == -INFINITY) {
                lse[(int64_t)row * num_heads + h] = -INFINITY;
                continue;
            }
            float total = 0.0f;
            for (int64_t i = first; i < stop; i++) {
                const int64_t entry = row_entries[i];
                const float part = part_lse[entry * num_heads + h];
                if (part == -INFINITY) continue;
                const float weight = exp_nonpositive1(part - total_max);
                const float *p = part_out + (entry * num_heads + h) * head_dim;
                total += weight;
#pragma omp simd
                for (int d = 0; d < head_dim; d++) o[d] += weight * p[d];
            }
            const float inv = 1.0f / total;
            for (int d = 0; d < head_dim; d++) o[d] *= inv;
            lse[(int64_t)row * num_heads + h] = total_max + logf(total);
        }
    }
    return 0;
}
