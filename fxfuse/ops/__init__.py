"""The fused operators, ``torch.ops.fxfuse.*``. Importing this package defines them."""
from fxfuse.ops import norm  # noqa: F401  (defines fxfuse::norm, fxfuse::add_norm, fxfuse::norm_backward)
