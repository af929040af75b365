"""The progress bar while a graph's kernels are prepared: drawn on stderr only when it is a terminal,
the graph has enough kernels, the option is on and no CI variable is set; never otherwise."""
import io
import sys

import pytest
import torch
import torch.nn as nn

import fxfuse
from fxfuse import config, progress


class Terminal(io.StringIO):
    """stderr as a terminal would be: tqdm draws only on a stream that says it is one."""

    def isatty(self):
        return True


class DistinctNorms(nn.Module):
    """``n`` RMSNorms with different eps: ``n`` distinct specs, hence ``n`` kernels."""

    def __init__(self, n: int):
        super().__init__()
        self.eps = [1e-6 * (i + 1) for i in range(n)]

    def forward(self, x):
        for eps in self.eps:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x


def _stderr_of_rewrite(monkeypatch, n_kernels: int, stream, **options) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    res = fxfuse.rewrite(DistinctNorms(n_kernels), (torch.randn(2, 8),), options=options)
    assert len(res.kernels) == n_kernels
    return stream.getvalue()


@pytest.fixture
def no_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # CI services set it; these tests decide it themselves


def test_bar_on_a_terminal_with_many_kernels(monkeypatch, no_ci):
    n = progress.MIN_KERNELS
    err = _stderr_of_rewrite(monkeypatch, n, Terminal())
    assert "fxfuse: generating kernels" in err and f"0/{n}" in err


@pytest.mark.parametrize("case", ["not-a-terminal", "few-kernels", "option-off", "ci"])
def test_no_bar(monkeypatch, no_ci, case):
    n, stream, options = progress.MIN_KERNELS, Terminal(), {}
    if case == "not-a-terminal":  # a pipe, a log file, pytest's capture
        stream = io.StringIO()
    elif case == "few-kernels":
        n -= 1
    elif case == "option-off":
        options = {"progress": False}
    else:
        monkeypatch.setenv("CI", "true")
    assert _stderr_of_rewrite(monkeypatch, n, stream, **options) == ""


@pytest.mark.parametrize("value, shown", [("0", False), ("off", False), ("", True), ("1", True)])
def test_environment_variable_turns_it_off(monkeypatch, value, shown):
    monkeypatch.setenv("FXFUSE_PROGRESS", value)
    assert config.Options().progress is shown  # the default is read from the environment
