/* The library's thread pool: parallel loops that end when their tasks are done, not when
   every thread has checked in.

   Why not OpenMP: an OpenMP loop ends at a barrier every thread of its team must reach. Beside
   another busy process, Linux kept both of our threads on one core and the busy process alone
   on the other (its wake-ups place a woken thread beside its waker), and every loop waited for
   the thread queued behind: measured on the 2-core machine with one spinning process beside a
   loop of small tasks (BENCHMARKS.md, "Steady beside a busy process"), OpenMP ran 1.7-2.2x
   slower than quiet whatever the schedule, thread count or wait policy; this pool 1.3x (and
   the engine, on the pool, 1.34-1.45x).

   How: a loop's tasks are claimed one at a time from a shared counter, and the loop ends when
   the last task is done, so a thread the scheduler parks holds back at most the task it holds,
   and a worker that wakes late finds nothing left. When the pool has as many threads as the
   CPUs the process may use, each worker is pinned to one of those CPUs; the caller takes part
   in each loop pinned to the CPU it is on (its affinity is restored after), and that CPU's
   worker sits the loop out and is not woken. So no two of our threads ever queue on one core
   while the other runs someone else's work. Workers poll briefly for the next loop before they
   sleep: longer polls win a little on a quiet machine and lose more beside a busy process.

   One loop at a time: a thread calling while another's loop runs runs its own loop itself.
   A forked child starts with no workers (threads do not survive fork). */

#define _GNU_SOURCE
#include "pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_WORKERS 256
#define WORKER_SPINS 1000 /* polls of the job word before a worker sleeps (~10 µs) */
#define CALLER_SPINS 100  /* polls of the done count before the caller sleeps */

static struct {
    pthread_mutex_t lock; /* held by the thread whose loop runs */
    int num_workers;      /* started so far */
    _Atomic uint32_t generation; /* futex word: the current loop's number */
    _Atomic uint64_t claim;      /* (loop number << 32) | next task */
    _Atomic uint32_t done;       /* futex word: the current loop's finished tasks */
    /* The current loop, written before its number is published. */
    pb_task_fn fn;
    void *ctx;
    int64_t num_tasks;
    int active;        /* workers that take part */
    int caller_cpu;    /* pinned pools: the CPU the caller runs on; its worker sits the loop out */
    int pinned;        /* one worker per allowed CPU, each on its own */
    int cpu[MAX_WORKERS];              /* pinned pools: each worker's CPU */
    uint32_t started_at[MAX_WORKERS]; /* the loop number when each worker was started */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

/* Sleeps on the loop number as worker `index`: woken only by loops it takes part in. */
static void futex_wait_worker(_Atomic uint32_t *word, uint32_t expected, int index) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_BITSET_PRIVATE, expected, NULL, NULL, 1u << (index % 32));
}

static void futex_wake_workers(_Atomic uint32_t *word, uint32_t workers) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_BITSET_PRIVATE, INT_MAX, NULL, NULL, workers);
}

static void futex_wake_all(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void pause_once(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs tasks of loop `loop` while any are left. */
static void run_tasks(uint32_t loop) {
    for (;;) {
        uint64_t claim = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(claim >> 32) != loop || (int64_t)(uint32_t)claim >= pool.num_tasks) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &claim, claim + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        /* The loop cannot end (nor the fields change) before this task is counted done. */
        const int64_t num_tasks = pool.num_tasks;
        pool.fn(pool.ctx, (int64_t)(uint32_t)claim);
        if ((int64_t)atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel) + 1 == num_tasks)
            futex_wake_all(&pool.done);
    }
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals (Ctrl-C) go to the caller's threads */
    uint32_t seen = pool.started_at[index]; /* the loop before the first it may take part in */
    int spins = 0;
    for (;;) {
        uint32_t loop;
        while ((loop = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (++spins < WORKER_SPINS) {
                pause_once();
            } else {
                futex_wait_worker(&pool.generation, seen, index);
                spins = 0;
            }
        }
        seen = loop;
        if (index < pool.active && !(pool.pinned && pool.cpu[index] == pool.caller_cpu)) {
            run_tasks(loop);
            spins = 0;
        } else {
            spins = WORKER_SPINS; /* not this loop's: sleep at once, off the caller's CPU */
        }
    }
    return NULL;
}

/* The first loop decides the pool: with as many threads as CPUs this process may use, one
   worker on each of those CPUs (the caller's sits each loop out, the caller taking its place);
   else num_threads − 1 workers, wherever the scheduler puts them. Called with the lock held. */
static void start_workers(int num_threads) {
    if (pool.num_workers > 0) return;
    cpu_set_t allowed;
    int num_cpus = 0;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
        for (int cpu = 0; cpu < CPU_SETSIZE && num_cpus < MAX_WORKERS; cpu++)
            if (CPU_ISSET(cpu, &allowed)) pool.cpu[num_cpus++] = cpu;
    pool.pinned = num_threads == num_cpus;
    int wanted = pool.pinned ? num_cpus : num_threads - 1;
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    while (pool.num_workers < wanted) {
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        if (pool.pinned) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(pool.cpu[pool.num_workers], &one);
            pthread_attr_setaffinity_np(&attributes, sizeof one, &one);
        }
        pool.started_at[pool.num_workers] = atomic_load_explicit(&pool.generation, memory_order_relaxed);
        pthread_t thread;
        int failed = pthread_create(&thread, &attributes, worker, (void *)(intptr_t)pool.num_workers);
        pthread_attr_destroy(&attributes);
        if (failed && pool.pinned) { /* pinning refused (a sandbox, say): unpinned workers */
            pool.pinned = 0;
            wanted = num_threads - 1;
            if (pool.num_workers >= wanted) break;
            failed = pthread_create(&thread, NULL, worker, (void *)(intptr_t)pool.num_workers);
            if (!failed) pthread_detach(thread);
        }
        if (failed) break;
        pool.num_workers++;
    }
}

static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pool.num_workers = 0;
}

static void run_here(int64_t num_tasks, pb_task_fn fn, void *ctx) {
    for (int64_t i = 0; i < num_tasks; i++) fn(ctx, i);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

void pb_parallel(int num_threads, int64_t num_tasks, pb_task_fn fn, void *ctx) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (num_tasks <= 0) return;
    if (num_threads <= 1 || num_tasks == 1 || num_tasks > UINT32_MAX || pthread_mutex_trylock(&pool.lock)) {
        run_here(num_tasks, fn, ctx);
        return;
    }
    pthread_once(&once, register_fork_handler);
    start_workers(num_threads);
    /* Pinned: the caller stays on the CPU it is on for the loop, that CPU's worker sits out. */
    cpu_set_t before, here;
    const int cpu = pool.pinned && num_threads == pool.num_workers ? sched_getcpu() : -1;
    const int pin_caller = cpu >= 0 && cpu < CPU_SETSIZE && sched_getaffinity(0, sizeof before, &before) == 0;
    pool.caller_cpu = pin_caller ? cpu : -1;
    if (pin_caller) {
        CPU_ZERO(&here);
        CPU_SET(cpu, &here);
        sched_setaffinity(0, sizeof here, &here);
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.num_tasks = num_tasks;
    pool.active = pin_caller ? pool.num_workers : num_threads - 1 < pool.num_workers ? num_threads - 1 : pool.num_workers;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t loop = atomic_load_explicit(&pool.generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&pool.claim, (uint64_t)loop << 32, memory_order_release);
    atomic_store_explicit(&pool.generation, loop, memory_order_release);
    uint32_t wake = 0;
    for (int i = 0; i < pool.active; i++)
        if (!(pool.pinned && pool.cpu[i] == pool.caller_cpu)) wake |= 1u << (i % 32);
    futex_wake_workers(&pool.generation, wake);
    run_tasks(loop);
    int spins = 0;
    uint32_t done;
    while ((int64_t)(done = atomic_load_explicit(&pool.done, memory_order_acquire)) < num_tasks) {
        if (++spins < CALLER_SPINS) {
            pause_once();
        } else {
            futex_wait(&pool.done, done);
            spins = 0;
        }
    }
    if (pin_caller) sched_setaffinity(0, sizeof before, &before);
    pthread_mutex_unlock(&pool.lock);
}
