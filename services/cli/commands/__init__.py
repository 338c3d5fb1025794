"""The `tunery` command groups, one module each."""
