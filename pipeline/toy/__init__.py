"""The procedural "shapes" toy world on the pipeline side: the renderer (``render``) and the
attribute checker (``checker``, a small CNN). Scenes and captions live in
``twostep.prompts.toy``. Submodules are imported explicitly so that rendering does not pull
in torch."""
