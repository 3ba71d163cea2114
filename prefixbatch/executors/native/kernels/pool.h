/* The library's thread pool (pool.c): its parallel loops run here rather than in OpenMP. */
#ifndef PB_POOL_H
#define PB_POOL_H

#include <stdint.h>

/* Runs fn(ctx, i) for i in [0, num_tasks) on up to num_threads threads, each task exactly
   once, and returns when all are done. Tasks are handed out one at a time, in order. */
typedef void (*pb_task_fn)(void *ctx, int64_t task);
void pb_parallel(int num_threads, int64_t num_tasks, pb_task_fn fn, void *ctx);

#endif
