"""twostep: distil an 8-step text-to-image teacher into a 2-step student.

Stages live in their own packages: :mod:`twostep.prompts` (prompt manifests),
:mod:`twostep.pipeline` (teacher and generation job), :mod:`twostep.trainer` (the student).
"""

__version__ = "0.6.0"
