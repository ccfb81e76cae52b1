"""``twostep.teacher.zimage_batched`` under the name ``pipeline_twostep.py`` imports it by.

``pipeline_twostep.py`` imports the batched forward as ``from .zimage_batched import ...``, so that the
same line works in two places: here, where it finds this module (a re-export of the one
implementation in ``twostep/teacher/zimage_batched.py``), and in an exported student folder, where
``TwoStepZImagePipeline.save_pretrained`` writes a copy of that implementation beside the pipeline
file and diffusers copies relatively imported files along with it.
"""

from twostep.teacher.zimage_batched import SEQ_MULTI_OF, batched_forward, supports_batched

__all__ = ["SEQ_MULTI_OF", "batched_forward", "supports_batched"]
