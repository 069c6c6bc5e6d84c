"""REKD: rationale-extraction distillation for encoder classifiers (BERT-like text, ViT images).

`python -m exgrpo_fast.rekd` trains a teacher select-predict RE model, a student RE model alone (the baseline)
and a student with REKD (its RE objective + KD on the teacher's predictions + BCE on the teacher's masks), then
writes results.json, a markdown table, rationale pictures and training curves. The formulation is in
exgrpo_fast/rekd/model.py's docstring; the built-in tasks in exgrpo_fast/rekd/data.py's.
"""
