/* span_attention.c over a bf16 store: `pb_span_attention_bf16`. A translation unit of its own,
   so the same code is compiled once for each store element (`kv_t`). */
#define PB_KV_BF16 1
#include "span_attention.c"
