"""Analysis of what training changed inside a model: a crosscoder on two checkpoints (`python -m
exgrpo_fast.analysis.crosscoder collect|train|report|steer`, see exgrpo_fast.analysis.crosscoder)."""
