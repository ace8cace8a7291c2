"""Experiment studies: loss study, ablation, cross-modality (config-driven, seeded, resumable)."""
