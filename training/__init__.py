"""Training path (CPT with LoRA, SFT), installed as `diffutron_engine.training`."""
