"""fxfuse: find hand-written attention and normalization in PyTorch graphs, fuse each site into one
operator, and generate a Triton kernel for exactly what that site computes.

    torch.compile(model, backend="fxfuse")
    res = fxfuse.rewrite(model, example_inputs); print(res.report())
"""
from fxfuse import config
from fxfuse.api import Rewrite, RewrittenModule, explain, rewrite
from fxfuse.backend import Backend, fxfuse_backend
from fxfuse.capture import CaptureError

__all__ = ["Backend", "CaptureError", "Rewrite", "RewrittenModule", "config", "explain", "fxfuse_backend", "rewrite"]
__version__ = "0.1.0"
