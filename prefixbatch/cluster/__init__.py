"""Running a job's shards on a Dask cluster (`cluster.kind: dask`); see `dask_run`."""
