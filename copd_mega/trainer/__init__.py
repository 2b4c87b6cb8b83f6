"""The loops: CoPD training (one step: rollouts -> rewards -> teaching -> update), pretraining,
evaluation."""
