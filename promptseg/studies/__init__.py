"""Experiment studies: loss study, ablation, cross-modality (config-driven, seeded, resumable)."""

from pathlib import Path

CACHE = Path("runs/study_cache")  # banks, embeddings and run results shared by the studies
