"""The method's pieces: sampling and the decode loop, rewards, log-probs, GRPO/OPD losses and rows,
the objective, teacher scores, the cycle schedule."""
