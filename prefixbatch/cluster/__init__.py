"""Running a job's shards on a Dask cluster (`cluster.kind: dask`); see `dask_run`."""

import threading

# One loader at a time in a worker process: transformers' lazy imports are not thread-safe,
# and a worker loads its engine (plugin thread) while it may tokenize a file (task thread).
LOAD_LOCK = threading.Lock()
