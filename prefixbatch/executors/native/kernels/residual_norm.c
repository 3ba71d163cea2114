/* The residual add and the RMSNorm that follows it, in one pass over the rows.

   Each decoder layer adds its attention output, then its MLP output, to the residual stream,
   and normalises the sum for the next product: x += delta; out = x / rms(x) · weight. As two
   PyTorch ops that is two passes over [T, E] and, above PyTorch's grain size, two parallel
   regions (a thread wake-up each); here it is one pass that also updates x in place, and a
   parallel region only for prefill-sized batches.

   fp32; rms(x) = sqrt(mean(x²) + eps), the product ordered as Hugging Face's RMSNorm:
   (x · 1/rms(x)) · weight.
*/

#include <math.h>
#include <stdint.h>

#include "pool.h"
#include "prefixbatch_kernels.h"

#define PARALLEL_FROM 131072 /* elements; below, waking a thread costs more than it saves */

typedef struct {
    float *x;
    const float *delta, *weight;
    float eps;
    float *out;
    int64_t rows, dim;
} Norm;

#define ROWS_A_TASK 16

static void norm_rows(void *ctx, int64_t task) {
    const Norm *n = ctx;
    const int64_t stop = (task + 1) * ROWS_A_TASK < n->rows ? (task + 1) * ROWS_A_TASK : n->rows;
    for (int64_t r = task * ROWS_A_TASK; r < stop; r++) {
        float *xr = n->x + r * n->dim;
        const float *dr = n->delta + r * n->dim;
        float *o = n->out + r * n->dim;
        float squares = 0.0f;
        for (int64_t d = 0; d < n->dim; d++) {
            xr[d] += dr[d];
            squares += xr[d] * xr[d];
        }
        const float inverse = 1.0f / sqrtf(squares / (float)n->dim + n->eps);
        for (int64_t d = 0; d < n->dim; d++) o[d] = xr[d] * inverse * n->weight[d];
    }
}

void pb_add_rms_norm(
    float *x, const float *delta, const float *weight, float eps, float *out, int64_t rows, int64_t dim,
    int num_threads) {
    Norm norm = {x, delta, weight, eps, out, rows, dim};
    pb_parallel(rows * dim >= PARALLEL_FROM ? num_threads : 1, (rows + ROWS_A_TASK - 1) / ROWS_A_TASK, norm_rows, &norm);
}

/* bf16: the same pass on bf16 arrays, each value rounded where Hugging Face's bf16 modules round
   it: x = bf16(x + delta); out = bf16(weight · bf16(x · 1/rms(x))), the statistics in fp32. */

static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even (finite values) */
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    uint16_t *x;
    const uint16_t *delta, *weight;
    float eps;
    uint16_t *out;
    int64_t rows, dim;
} NormBf16;

static void norm_rows_bf16(void *ctx, int64_t task) {
    const NormBf16 *n = ctx;
    const int64_t stop = (task + 1) * ROWS_A_TASK < n->rows ? (task + 1) * ROWS_A_TASK : n->rows;
    for (int64_t r = task * ROWS_A_TASK; r < stop; r++) {
        uint16_t *xr = n->x + r * n->dim;
        const uint16_t *dr = n->delta + r * n->dim;
        uint16_t *o = n->out + r * n->dim;
        float squares = 0.0f;
        for (int64_t d = 0; d < n->dim; d++) {
            xr[d] = to_bf16(from_bf16(xr[d]) + from_bf16(dr[d]));
            const float v = from_bf16(xr[d]);
            squares += v * v;
        }
        const float inverse = 1.0f / sqrtf(squares / (float)n->dim + n->eps);
        for (int64_t d = 0; d < n->dim; d++)
            o[d] = to_bf16(from_bf16(n->weight[d]) * from_bf16(to_bf16(from_bf16(xr[d]) * inverse)));
    }
}

void pb_add_rms_norm_bf16(
    uint16_t *x, const uint16_t *delta, const uint16_t *weight, float eps, uint16_t *out, int64_t rows, int64_t dim,
    int num_threads) {
    NormBf16 norm = {x, delta, weight, eps, out, rows, dim};
    pb_parallel(rows * dim >= PARALLEL_FROM ? num_threads : 1, (rows + ROWS_A_TASK - 1) / ROWS_A_TASK, norm_rows_bf16,
                &norm);
}
