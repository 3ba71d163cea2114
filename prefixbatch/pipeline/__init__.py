"""Pipeline: input files (Parquet over fsspec), validation, tokenization, and the output
folder (parts, commit records, resume).

Knows about tables and token ids: turns rows into `Request`s and error rows, and writes
`Completion`s back as committed parts. Never imports an executor or torch.
"""
