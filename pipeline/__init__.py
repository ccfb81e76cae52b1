"""Teacher generation: the Ray job and its workers, the shard store (layout, format, I/O), ``twostep verify`` and the Hugging Face helpers."""
