"""detbench's harness: the measurement library (inputs, checks, timing, results, pinpoint) under ``bench.cli``."""
