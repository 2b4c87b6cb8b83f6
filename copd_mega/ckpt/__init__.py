"""Checkpoints: distributed step and model checkpoints, the offline reader/writer and merge, RNG
state."""
