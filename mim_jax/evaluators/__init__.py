"""Evaluators of a pretrained encoder: features, linear probe, reconstruction grids."""
