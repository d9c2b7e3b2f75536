"""rollingq: fused Triton attention for multimodal Transformers with RollingQ query rotation."""
from .functional import rollingq_attention
from .reference import rollingq_attention_reference
from .stats import AttentionStats

__all__ = ["rollingq_attention", "rollingq_attention_reference", "AttentionStats"]
__version__ = "0.1.0"
