"""Pipeline: Parquet and fsspec I/O, input validation, tokenization, and output writing.

Knows about tables and token ids; hands `Request`s to executors and takes `Completion`s back.
"""
