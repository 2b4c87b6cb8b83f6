"""copd-mega: Co-Evolving Policy Distillation on megatron-core."""

import warnings

# megatron-core announces every optional fused kernel it falls back from; say it once, in docs.
for _msg in (
    ".*Apex is not installed.*",
    ".*Transformer Engine and Apex.*",
    ".*absl.logging.*",
    ".*full scope is deprecated.*",
    ".*reduce_scatter_tensor.*",
    ".*all_gather_into_tensor.*",
):
    warnings.filterwarnings("ignore", message=_msg)

__version__ = "0.1.0"
