"""detbench's harness: identical inputs through every backend, checks, timing, results, CLI."""
