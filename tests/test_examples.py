"""Every example runs as a user runs it (``python examples/x.py``, CPU) and prints what it promises."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxfuse.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # set by conftest for this process; examples run as users run them
    done = subprocess.run([sys.executable, str(REPO / "examples" / name)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_no_example_shadows_a_standard_module():
    """``python examples/x.py`` puts examples/ first on sys.path: a file there named like a standard
    module (inspect.py, the issue's name for inspect_rewrite.py) is what ``import torch`` would
    import instead, and every example would fail with a circular import."""
    names = {p.stem for p in (REPO / "examples").glob("*.py")}
    assert "inspect_rewrite" in names
    assert not names & set(sys.stdlib_module_names)


def test_quickstart():
    out = run_example("quickstart.py")
    summary = out.splitlines()[0]  # other families (attention) may be fused too: count the norms
    assert summary.startswith("fxfuse.rewrite(Block):") and "1 layer_norm" in summary and "2 rms_norm" in summary
    assert "# spec: {" in out  # the generated kernel is printed
    assert "rewritten output equals eager" in out
    assert "backend='fxfuse') output equals eager too" in out


def test_inspect_rewrite():
    out = run_example("inspect_rewrite.py")
    assert "2 fused site(s):" in out and "kind=rms_norm source=inspect_rewrite.py:" in out
    assert "kind=layer_norm" in out and "eps read from the graph: 1e-05" in out
    assert "2 declined site(s):" in out and "unbiased" in out and "reduces over dims [1]" in out
    assert "2 kernel(s):" in out and "fxfuse.norm.default" in out
    assert "the rewritten module's output equals eager" in out
    html_path = out.strip().splitlines()[-1].removeprefix("HTML report: ")
    page = Path(html_path).read_text()
    assert "graph before the passes:" in out
    assert page.count("<svg") == 2 and 'id="kernels"' in page  # the graph before and after the passes


def test_transformers_llama():
    out = run_example("transformers_llama.py")
    # 2 decoder layers x (input norm + post-attention norm) + the final norm.
    assert out.count("rms_norm at ") == 5
    assert "modeling_llama.py" in out  # sites point at transformers' own source lines
    assert "logits equal eager" in out
    page = Path(out.strip().splitlines()[-1].removeprefix("HTML report: ")).read_text()
    assert 'id="graph0-matches"' in page and "modeling_llama.py" in page and page.count("<svg") >= 2


def test_custom_attention():
    out = run_example("custom_attention.py")
    assert "1 fused (1 attention)" in out.splitlines()[0]
    assert "softcap 30" in out and "scale 0.25" in out  # the site's spec in words
    assert "@triton.jit" in out  # the generated kernel is printed
    assert "rewritten output equals eager" in out


@pytest.mark.parametrize("name", ["quickstart", "inspect_rewrite", "custom_attention", "transformers_llama", "train_gpt"])
def test_every_example_has_a_factory_for_fxfuse_explain(name, capsys):
    """``fxfuse explain examples/NAME.py:make`` (the command's help points there)."""
    code = main(["explain", str(REPO / "examples" / f"{name}.py") + ":make"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert re.search(r"\d+ candidate site\(s\), [1-9]\d* fused", out.splitlines()[0]), out.splitlines()[0]
