"""Models shipped with the package: the bundled demo model `tiny-tr` (a folder of data, resolved by
diffutron_engine.loading.BUNDLED_MODELS) and random_weights, which builds random-weight mmBERT-shaped
models and their tokenizer locally for tests, demos and benchmarks."""
