"""The `imagegen` command line: one module per command group, with the shared options and error contract."""
