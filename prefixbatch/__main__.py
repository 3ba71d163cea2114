"""`python -m prefixbatch` is the same as the `prefixbatch` command."""

from prefixbatch.jobs.cli import main

raise SystemExit(main())
