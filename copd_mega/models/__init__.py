"""The branch model: the GPT, the vision-language model, the one builder (DDP + optimizer),
forward/backward and the optimizer step."""
