"""The benchmarks behind `diffutron-engine bench`: throughput (the oracle and each engine mode, on a
random-weight mmBERT), overhead (the engine's own cost beside the bare model), likelihood (the lm-eval
model's Monte-Carlo likelihood, plain vs batched) and serve (load on a running server); their modes
(modes.py, no torch) and what they all measure alike (measure.py). The command line is cli/bench.py."""
