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
