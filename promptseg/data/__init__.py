"""Data readers, writers and (in other modules) training datasets."""
