"""Utilities every stage uses and none owns: config dataclasses as command-line flags, the log
format, one-line errors, EMA weights, image grids. Nothing here imports a stage."""
