"""The teacher: loading a diffusers pipeline, its exact sampler and velocity convention
(``core``), the batched transformer forward (``zimage_batched``), and random-weight Z-Image
pipelines built locally (``random_zimage``). Generation, training, eval and sample all reach the
teacher through ``core.Teacher``."""
