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

#define PARALLEL_FROM 131072 /* elements; below, waking a thread costs more than it saves */

void pb_add_rms_norm(
    float *x, const float *delta, const float *weight, float eps, float *out, int64_t rows, int64_t dim,
    int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * dim;
        const float *dr = delta + r * dim;
        float *o = out + r * dim;
        float squares = 0.0f;
        for (int64_t d = 0; d < dim; d++) {
            xr[d] += dr[d];
            squares += xr[d] * xr[d];
        }
        const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
        for (int64_t d = 0; d < dim; d++) o[d] = xr[d] * inverse * weight[d];
    }
}
