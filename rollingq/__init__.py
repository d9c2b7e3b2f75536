"""rollingq: fused Triton attention for multimodal Transformers with RollingQ query rotation."""
from .functional import rollingq_attention
from .reference import rollingq_attention_reference
from .stats import AttentionStats
from . import rotation
from .controller import RollingQ
from .modules import RollingQAttention

__all__ = ["rollingq_attention", "rollingq_attention_reference", "AttentionStats", "rotation", "RollingQ",
           "RollingQAttention"]
__version__ = "0.1.0"
