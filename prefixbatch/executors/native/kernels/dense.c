/* Dense layers: y = x Wᵀ + bias, then optionally silu(y) or y · other, on the library's pool.

   Why our own product rather than PyTorch's (oneDNN): oneDNN splits every product statically
   between OpenMP threads and ends it at a barrier, so beside another busy process each product
   waits for whichever thread the scheduler parked (pool.c). Here a product is many small tasks
   on the pool, and its speed on a quiet machine is oneDNN's (BENCHMARKS.md, "Steady beside a
   busy process": 241-256 GFLOP/s a core on the model's shapes, oneDNN 231-255).

   Layout: W [N, K] is packed once into panels of 64 output columns, each K rows of 64 floats
   (column-major within the panel; the last panel zero-padded), so a task streams its panel
   once and keeps 6 rows × 64 columns of sums in registers, broadcasting one x value to 4
   vector products at a time. K is taken in blocks of KC (a panel's block stays in L2 while
   every row of the task uses it); sums of earlier blocks wait in y.

   A task is a block of rows × one panel; tasks are numbered panel by panel, so threads taking
   consecutive tasks share the panel they read. The sums are fp32 in k order, fused
   multiply-adds: equal to PyTorch's products within fp32 rounding, not bit for bit.

   AVX-512 only (`pb_dense_available`); elsewhere the engine keeps oneDNN. The bf16 products
   below need AVX512-BF16 too (`pb_dense_bf16_available`). */

#include <math.h>
#include <stdint.h>

#include "pool.h"
#include "prefixbatch_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#define PANEL 64 /* output columns a panel */
#define ROWS 6   /* rows a register block */
#define KC 1024  /* k values a block: its panel part (256 KB) and 96 rows of x (384 KB) share L2 */
#define MIN_TASK_FLOPS 200000 /* below, a product is one task: a wake-up costs more */

enum { THEN_NONE = 0, THEN_SWISH = 1, THEN_TIMES = 2 };

int pb_dense_available(void) { return 1; }

int64_t pb_dense_packed_floats(int64_t n, int64_t k) { return (n + PANEL - 1) / PANEL * PANEL * k; }

typedef struct {
    const float *w;
    int64_t n, k;
    float *out;
} Pack;

static void pack_panel(void *ctx, int64_t p) {
    const Pack *pack = ctx;
    float *out = pack->out + p * pack->k * PANEL;
    for (int64_t kk = 0; kk < pack->k; kk++)
        for (int c = 0; c < PANEL; c++) {
            const int64_t col = p * PANEL + c;
            out[kk * PANEL + c] = col < pack->n ? pack->w[col * pack->k + kk] : 0.0f;
        }
}

/* W [n, k] → out [pb_dense_packed_floats(n, k)]. */
void pb_dense_pack(const float *w, int64_t n, int64_t k, float *out, int num_threads) {
    Pack pack = {w, n, k, out};
    pb_parallel(num_threads, (n + PANEL - 1) / PANEL, pack_panel, &pack);
}

/* e^x for x ≤ 88 (below -87 it is 0 within fp32): 2^n · p(r), r = x − n ln 2, |r| ≤ ln2/2,
   p the degree-7 Taylor polynomial (relative error < 1e-8). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The 4 vectors' masks of panel p's 64 columns: the columns that exist (n of them in all). */
static inline void panel_masks(int64_t n, int64_t p, __mmask16 mask[4]) {
    for (int j = 0; j < 4; j++) {
        const int64_t valid = n - p * PANEL - 16 * j;
        mask[j] = valid >= 16 ? 0xFFFF : valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
    }
}

/* fn(pr, rows, r, ...) for the rows [r, r1) left, at most ROWS, with the count a constant (so
   `fn`, always inlined, keeps its sums in registers). */
#define BLOCK_OF_ROWS(fn, r1, r, ...)                                                                                \
    switch ((r1) - (r) < ROWS ? (r1) - (r) : ROWS) {                                                                 \
    case 6: fn(pr, 6, r, __VA_ARGS__); break;                                                                        \
    case 5: fn(pr, 5, r, __VA_ARGS__); break;                                                                        \
    case 4: fn(pr, 4, r, __VA_ARGS__); break;                                                                        \
    case 3: fn(pr, 3, r, __VA_ARGS__); break;                                                                        \
    case 2: fn(pr, 2, r, __VA_ARGS__); break;                                                                        \
    default: fn(pr, 1, r, __VA_ARGS__); break;                                                                       \
    }

typedef struct {
    const float *x;
    int64_t rows, k;
    const float *packed;
    int64_t n;
    const float *bias;
    int then;
    const float *other;
    float *y;
    int64_t row_block, row_blocks;
} Product;

/* Rows [r, r + mr) × one panel over k block [k0, k0 + kc): sums into registers (from bias or
   zero on the first block, from y after it), then stored, with the post-op after the last. */
static inline __attribute__((always_inline)) void block(const Product *pr, const int mr, int64_t r, int64_t p,
                                                        int64_t k0, int kc, const __mmask16 mask[4]) {
    const int64_t col = p * PANEL;
    float *y = pr->y + r * pr->n + col;
    const float *a = pr->x + r * pr->k + k0;
    const float *b = pr->packed + (p * pr->k + k0) * PANEL;
    __m512 acc[ROWS][4];
    for (int j = 0; j < 4; j++) {
        const __m512 start = pr->bias ? _mm512_maskz_loadu_ps(mask[j], pr->bias + col + 16 * j) : _mm512_setzero_ps();
        for (int i = 0; i < mr; i++)
            acc[i][j] = k0 == 0 ? start : _mm512_maskz_loadu_ps(mask[j], y + i * pr->n + 16 * j);
    }
    for (int kk = 0; kk < kc; kk++, b += PANEL) {
        const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
        const __m512 b2 = _mm512_load_ps(b + 32), b3 = _mm512_load_ps(b + 48);
        for (int i = 0; i < mr; i++) {
            const __m512 ai = _mm512_set1_ps(a[i * pr->k + kk]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(ai, b2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(ai, b3, acc[i][3]);
        }
    }
    const int last = k0 + kc == pr->k;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) {
            __m512 v = acc[i][j];
            if (last && pr->then == THEN_SWISH) {
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
                v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            } else if (last && pr->then == THEN_TIMES) {
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask[j], pr->other + (r + i) * pr->n + col + 16 * j));
            }
            _mm512_mask_storeu_ps(y + i * pr->n + 16 * j, mask[j], v);
        }
}

static void product_task(void *ctx, int64_t task) {
    const Product *pr = ctx;
    const int64_t p = task / pr->row_blocks;
    const int64_t r0 = task % pr->row_blocks * pr->row_block;
    const int64_t r1 = r0 + pr->row_block < pr->rows ? r0 + pr->row_block : pr->rows;
    __mmask16 mask[4];
    panel_masks(pr->n, p, mask);
    for (int64_t k0 = 0; k0 < pr->k; k0 += KC) {
        const int kc = pr->k - k0 < KC ? (int)(pr->k - k0) : KC;
        for (int64_t r = r0; r < r1; r += ROWS) {
            BLOCK_OF_ROWS(block, r1, r, p, k0, kc, mask)
        }
    }
}

/* x [rows, k] contiguous, packed (`pb_dense_pack` of W [n, k]), bias [n] or NULL → y [rows, n]
   = x Wᵀ + bias; then 1: silu(y); 2: y · other ([rows, n], contiguous). */
void pb_dense(const float *x, int64_t rows, int64_t k, const float *packed, int64_t n, const float *bias, int then,
              const float *other, float *y, int num_threads) {
    if (rows <= 0 || n <= 0) return;
    const int64_t panels = (n + PANEL - 1) / PANEL;
    /* Rows in blocks of 96 above 144 (a block × panel is then ~25 µs of work at the least);
       decode-sized products are one block, their panels the tasks. */
    const int64_t row_block = rows > 144 ? 96 : rows;
    Product pr = {x, rows, k, packed, n, bias, then, other, y, row_block, (rows + row_block - 1) / row_block};
    const double flops = 2.0 * (double)rows * (double)n * (double)k;
    pb_parallel(flops < MIN_TASK_FLOPS ? 1 : num_threads, panels * pr.row_blocks, product_task, &pr);
}

/* bf16 weights and activations, fp32 sums (AVX512-BF16's pairwise dot product, `vdpbf16ps`).

   Packed like the fp32 panels but by pairs of k: for each pair, the panel's 64 columns × the
   pair's two values, so one 64-byte load holds 16 columns × 2 k and one dot-product
   instruction adds both to 16 sums. Each x pair is broadcast as one 32-bit value. k must be
   even (every model dimension is). Sums of earlier k blocks wait in fp32 `scratch` (only when
   k exceeds one block), never in the bf16 output.

   The outputs are rounded as Hugging Face's bf16 modules round them (round to nearest even):
   y = bf16(x Wᵀ + b); swish: bf16(silu(y)) of the rounded y; times: bf16(y · other) of the
   rounded y — the same values `F.linear`, `F.silu` and `*` give in bf16, up to the order
   of the fp32 sums. */
#if defined(__AVX512BF16__)

#define KC_PAIRS 512 /* k pairs a block: 128 KB of a panel */

int pb_dense_bf16_available(void) { return 1; }

int64_t pb_dense_bf16_packed_halves(int64_t n, int64_t k) { return (n + PANEL - 1) / PANEL * PANEL * k; }

typedef struct {
    const uint16_t *w;
    int64_t n, k;
    uint16_t *out;
} PackBf16;

static void pack_panel_bf16(void *ctx, int64_t p) {
    const PackBf16 *pack = ctx;
    uint16_t *out = pack->out + p * pack->k * PANEL;
    for (int64_t pair = 0; pair < pack->k / 2; pair++)
        for (int c = 0; c < PANEL; c++)
            for (int e = 0; e < 2; e++) {
                const int64_t col = p * PANEL + c;
                out[(pair * PANEL + c) * 2 + e] = col < pack->n ? pack->w[col * pack->k + 2 * pair + e] : 0;
            }
}

/* W [n, k] bf16 (k even) → out [pb_dense_bf16_packed_halves(n, k)] bf16. */
void pb_dense_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *out, int num_threads) {
    PackBf16 pack = {w, n, k, out};
    pb_parallel(num_threads, (n + PANEL - 1) / PANEL, pack_panel_bf16, &pack);
}

typedef struct {
    const uint16_t *x;
    int64_t rows, k;
    const uint16_t *packed;
    int64_t n;
    const uint16_t *bias;
    int then;
    const uint16_t *other;
    uint16_t *y;
    float *scratch; /* [rows, n] fp32 where k spans several blocks, else NULL */
    int64_t row_block, row_blocks;
} ProductBf16;

static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

static inline __m256i narrow(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* v rounded to bf16 and back: the value a bf16 tensor would hold. */
static inline __m512 rounded(__m512 v) { return widen(narrow(v)); }

static inline __attribute__((always_inline)) void block_bf16(const ProductBf16 *pr, const int mr, int64_t r, int64_t p,
                                                             int64_t kp0, int kpc, const __mmask16 mask[4]) {
    const int64_t col = p * PANEL;
    const int64_t last = 2 * (kp0 + kpc) == pr->k;
    const uint16_t *a = pr->x + r * pr->k + 2 * kp0;
    const uint16_t *b = pr->packed + (p * pr->k + 2 * kp0) * PANEL;
    float *sums = pr->scratch ? pr->scratch + r * pr->n + col : NULL;
    __m512 acc[ROWS][4];
    for (int j = 0; j < 4; j++) {
        const __m512 start = pr->bias ? widen(_mm256_maskz_loadu_epi16(mask[j], pr->bias + col + 16 * j)) : _mm512_setzero_ps();
        for (int i = 0; i < mr; i++)
            acc[i][j] = kp0 == 0 ? start : _mm512_maskz_loadu_ps(mask[j], sums + i * pr->n + 16 * j);
    }
    for (int kk = 0; kk < kpc; kk++, b += 2 * PANEL) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 32);
        const __m512bh b2 = (__m512bh)_mm512_load_si512(b + 64), b3 = (__m512bh)_mm512_load_si512(b + 96);
        for (int i = 0; i < mr; i++) {
            uint32_t pair;
            __builtin_memcpy(&pair, a + i * pr->k + 2 * kk, sizeof pair);
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, b2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], ai, b3);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) {
            if (!last) {
                _mm512_mask_storeu_ps(sums + i * pr->n + 16 * j, mask[j], acc[i][j]);
                continue;
            }
            __m512 v = rounded(acc[i][j]);
            if (pr->then == THEN_SWISH) {
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
                v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            } else if (pr->then == THEN_TIMES) {
                v = _mm512_mul_ps(v, widen(_mm256_maskz_loadu_epi16(mask[j], pr->other + (r + i) * pr->n + col + 16 * j)));
            }
            _mm256_mask_storeu_epi16(pr->y + (r + i) * pr->n + col + 16 * j, mask[j], narrow(v));
        }
}

static void product_task_bf16(void *ctx, int64_t task) {
    const ProductBf16 *pr = ctx;
    const int64_t p = task / pr->row_blocks;
    const int64_t r0 = task % pr->row_blocks * pr->row_block;
    const int64_t r1 = r0 + pr->row_block < pr->rows ? r0 + pr->row_block : pr->rows;
    __mmask16 mask[4];
    panel_masks(pr->n, p, mask);
    const int64_t pairs = pr->k / 2;
    for (int64_t kp0 = 0; kp0 < pairs; kp0 += KC_PAIRS) {
        const int kpc = pairs - kp0 < KC_PAIRS ? (int)(pairs - kp0) : KC_PAIRS;
        for (int64_t r = r0; r < r1; r += ROWS) {
            BLOCK_OF_ROWS(block_bf16, r1, r, p, kp0, kpc, mask)
        }
    }
}

int64_t pb_dense_bf16_scratch_floats(int64_t rows, int64_t n, int64_t k) { return k / 2 > KC_PAIRS ? rows * n : 0; }

/* As `pb_dense`, bf16: x [rows, k], packed (`pb_dense_bf16_pack`), bias [n] or NULL, other
   [rows, n] → y [rows, n]; scratch: `pb_dense_bf16_scratch_floats` fp32 (NULL when 0). */
void pb_dense_bf16(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n, const uint16_t *bias,
                   int then, const uint16_t *other, uint16_t *y, float *scratch, int num_threads) {
    if (rows <= 0 || n <= 0) return;
    const int64_t panels = (n + PANEL - 1) / PANEL;
    const int64_t row_block = rows > 144 ? 96 : rows;
    ProductBf16 pr = {x, rows, k, packed, n, bias, then, other, y, scratch, row_block, (rows + row_block - 1) / row_block};
    const double flops = 2.0 * (double)rows * (double)n * (double)k;
    pb_parallel(flops < MIN_TASK_FLOPS ? 1 : num_threads, panels * pr.row_blocks, product_task_bf16, &pr);
}

#else

int pb_dense_bf16_available(void) { return 0; }

#endif /* __AVX512BF16__ */

#else

int pb_dense_available(void) { return 0; }
int pb_dense_bf16_available(void) { return 0; }

#endif
