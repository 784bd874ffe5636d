"""The Gemma 3 language model: config presets, NNX modules with named sites, loading."""
