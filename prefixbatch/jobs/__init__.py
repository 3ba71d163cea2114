"""Jobs: the spec file, the CLI verbs, and running one job end to end (read → plan → execute → write)."""
