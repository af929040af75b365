"""The fused operators, ``torch.ops.fxfuse.*``. Importing this package defines them."""
from fxfuse.ops import norm  # noqa: F401  (defines fxfuse::norm, add_norm, sum_norm, norm_backward)
from fxfuse.ops import attention  # noqa: F401,E402  (defines fxfuse::attention, fxfuse::attention_backward)
from fxfuse.ops import attention_rope  # noqa: F401,E402  (defines fxfuse::attention_rope and its backward)
from fxfuse.ops import linear_cross_entropy  # noqa: F401,E402  (defines fxfuse::linear_cross_entropy and its backward)
from fxfuse.ops import gated_mlp  # noqa: F401,E402  (defines fxfuse::gated_act and its backward)
from fxfuse.ops import dyt  # noqa: F401,E402  (defines fxfuse::dyt and its backward)
from fxfuse.ops import polynorm  # noqa: F401,E402  (defines fxfuse::polynorm and its backward)
from fxfuse.ops import linear_attention  # noqa: F401,E402  (defines fxfuse::linear_attention and its backward)
