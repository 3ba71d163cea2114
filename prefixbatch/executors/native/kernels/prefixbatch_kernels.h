/* The library's interface: every entry point it exports, and the attention call's arguments.

   span_kernel.py mirrors `struct pb_span_args` field for field as a ctypes.Structure (same
   names, same order) and refuses a library whose `pb_span_args_size()` is not the size of its
   copy. The library is built with -fvisibility=hidden, so what is marked PB_EXPORT here is all
   it exports (the pool's `pb_parallel` stays inside). Fields are ordered 8-byte ones first:
   no padding between them on any 64-bit ABI. */
#ifndef PREFIXBATCH_KERNELS_H
#define PREFIXBATCH_KERNELS_H

#include <stdint.h>

#define PB_EXPORT __attribute__((visibility("default")))

/* One call of `pb_span_attention`: a layer's whole attention plan (span_attention.c says what
   each array holds). fp32 tensors, int64 index arrays; NULL where an optional part is absent. */
struct pb_span_args {
    const float *q;          /* [T, H, D], rows q_row_stride floats apart */
    int64_t q_row_stride;
    void *keys, *values;     /* [capacity, Hkv, D] each: the layer's store, fp32 (bf16: `_bf16`) */
    int64_t num_tasks;       /* run the first num_tasks rows of `tasks`; the rest are only chained */
    const int64_t *tasks;    /* [*, 6] */
    const int64_t *entry_row, *entry_visible; /* [E] each */
    const int64_t *row_ptr, *row_entries;     /* [T + 1], each row's entries */
    const float *k_new;      /* [num_new, Hkv, D] or NULL: stored at `slots` first */
    int64_t k_row_stride;
    const float *v_new;
    int64_t v_row_stride;
    const int64_t *slots;    /* [num_new] */
    int64_t num_new;
    const float *cos, *sin;     /* [num_new, D/2] or NULL: k_new is rotated (rope) as stored */
    const float *q_cos, *q_sin; /* [T, D/2] or NULL: q is rotated as loaded */
    float *part_out, *part_lse; /* [E, H, D], [E, H]: scratch for rows with several entries */
    float *out, *lse;           /* [T, H, D], [T, H] */
    int32_t num_rows_out, num_heads, num_kv_heads, head_dim;
    float scale;
    int32_t num_threads;
};

PB_EXPORT int64_t pb_span_args_size(void);

/* The widest vectors this build computes with, in bytes: 64 (AVX-512), 32 (AVX, AVX2), else 16. */
PB_EXPORT int pb_vector_bytes(void);

/* 0, or 1 where the shapes are refused (heads not 16·n up to the limits). */
PB_EXPORT int pb_span_attention(const struct pb_span_args *args);
/* The same over a bf16 store (keys, values; the step's new ones are rounded to bf16 as stored,
   q and every sum stay fp32): span_attention_bf16.c. */
PB_EXPORT int pb_span_attention_bf16(const struct pb_span_args *args);
PB_EXPORT int pb_span_attention_limits(int *max_queries_per_task, int *max_head_dim, int *dot_max_queries);

/* residual_norm.c */
PB_EXPORT void pb_add_rms_norm(float *x, const float *delta, const float *weight, float eps, float *out,
                               int64_t rows, int64_t dim, int num_threads);

/* dense.c: 1 where the library has its products (AVX-512 builds); the other three exist only then. */
PB_EXPORT int pb_dense_available(void);
PB_EXPORT int64_t pb_dense_packed_floats(int64_t n, int64_t k);
PB_EXPORT void pb_dense_pack(const float *w, int64_t n, int64_t k, float *out, int num_threads);
PB_EXPORT void pb_dense(const float *x, int64_t rows, int64_t k, const float *packed, int64_t n, const float *bias,
                        int then, const float *other, float *y, int num_threads);

/* dense.c, bf16 (AVX512-BF16 builds; the other four exist only then): as above, bf16 arrays
   (uint16_t), fp32 sums, outputs rounded to bf16 as PyTorch's bf16 ops round them. */
PB_EXPORT int pb_dense_bf16_available(void);
PB_EXPORT int64_t pb_dense_bf16_packed_halves(int64_t n, int64_t k);
PB_EXPORT int64_t pb_dense_bf16_scratch_floats(int64_t rows, int64_t n, int64_t k);
PB_EXPORT void pb_dense_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *out, int num_threads);
PB_EXPORT void pb_dense_bf16(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n,
                             const uint16_t *bias, int then, const uint16_t *other, uint16_t *y, float *scratch,
                             int num_threads);

/* residual_norm.c, bf16: as pb_add_rms_norm with x, delta, weight, out bf16 (uint16_t), rounded
   where Hugging Face's bf16 modules round (the sum, the normalised x, its product by weight). */
PB_EXPORT void pb_add_rms_norm_bf16(uint16_t *x, const uint16_t *delta, const uint16_t *weight, float eps,
                                    uint16_t *out, int64_t rows, int64_t dim, int num_threads);

#endif
