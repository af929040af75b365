"""One of several processes that compile the same kernel at once (run by test_cache.py).

Usage: python cache_worker.py GO_FILE ITERATIONS SPEC_JSON. FXFUSE_CACHE_DIR and TRITON_INTERPRET
come from the environment. The worker imports everything, announces it is ready, waits for GO_FILE
(so the processes really start together), then compiles the kernel and runs it through Triton's
interpreter; then ITERATIONS times it damages the cache file with a plain, non-atomic write (half
the text, or garbage), forgets what it loaded, and compiles and runs the kernel again, while the
other workers do the same. Every run is compared with the torch reference. Prints one JSON line.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from fxfuse import runtime
from fxfuse.runtime import cache
from fxfuse.runtime import norm as kernels
from fxfuse.ops.norm import reference
from fxfuse.spec import NormSpec


def run_once(spec, x, params) -> float:
    y, _ = kernels.forward(spec, x, None, params)
    return (y - reference(spec, x, params)).abs().max().item()


def main() -> None:
    go, iterations, spec = Path(sys.argv[1]), int(sys.argv[2]), NormSpec.from_json(sys.argv[3])
    torch.manual_seed(os.getpid())
    x = torch.randn(3, 8)
    params = [torch.randn(8) for _ in spec.params]
    Path(f"{go}.ready.{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        time.sleep(0.005)
    errors = [run_once(spec, x, params)]  # every process compiles the kernel for the first time at once
    path = Path(os.environ["FXFUSE_CACHE_DIR"]) / f"{runtime.kernel(spec).name}.py"
    for i in range(iterations):
        text = path.read_bytes() if path.exists() else b""
        with open(path, "wb") as f:  # deliberately not atomic: a crashed or careless writer
            f.write(text[: len(text) // 2] if i % 2 else b"\xff\xfe garbage \x00")
        cache.forget()
        errors.append(run_once(spec, x, params))
    print(json.dumps({"pid": os.getpid(), "runs": len(errors), "max_error": max(errors)}))


if __name__ == "__main__":
    main()
