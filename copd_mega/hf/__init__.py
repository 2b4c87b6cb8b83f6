"""Hugging Face conversion: config.json families, tensor mappings, export, import, LLaVA,
init_from_hf."""
