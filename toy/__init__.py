"""The procedural "shapes" toy world, the embedded default: scenes, captions and toy manifests
(``world``), the renderer (``render``), the attribute checker (``checker``, a small CNN), the toy
teacher's training (``train_teacher``) and its evaluation (``evaluate``, ``diagnose``). The
shipped toy teacher is the pipeline folder ``teacher/``. Submodules are imported explicitly so that
rendering does not pull in torch."""
