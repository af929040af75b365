"""The kernels as a GPU would compile them, checked on a machine without one: Triton compiles the
golden kernels for sm_90 (its compiler and the ptxas it ships, no driver) at the launch configs
fxfuse would try, and ptxas reports registers, spills and the tensor-core instructions. Kept to a
small set (each config is seconds of ptxas): the bf16 forward kernels at head dims 64 and 128 and
the backward kernels at 128, each function searching its candidate list from the end (where the
small fallback config is) and stopping at its first good config -- the claims are "some config
fxfuse tries is good", so the order of the search does not matter -- and the Llama RMSNorm
through ``fxfuse kernels DIR --target sm_90 --json``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fxfuse.runtime.static_check import check, launch, mma_class
from tests.codegen.test_golden import GOLDEN_DIR
from tests.codegen.test_golden_attention import SPECS

BF16_SPECS = ("causal_bf16", "bf16_scores_f32_softmax")


@pytest.fixture(scope="module")
def attention_rows():
    launches = [launch(SPECS[case], d=d, dv=d, lq=4096, lk=4096, dtype="bfloat16") for case in BF16_SPECS
                for d in (64, 128)]
    forward = list(check(launches, "sm_90", functions=("forward",), first_good=True, last_first=True))
    backward = list(check([launch(SPECS["causal_bf16"], d=128, dv=128, lq=4096, lk=4096, dtype="bfloat16")], "sm_90",
                          functions=("backward_dkdv", "backward_dq"), first_good=True, last_first=True))
    return forward + backward


@pytest.mark.parametrize("case", BF16_SPECS)
@pytest.mark.parametrize("d", [64, 128])
def test_every_bf16_forward_has_a_wgmma_config_without_spills_on_sm90(attention_rows, case, d):
    from fxfuse.codegen.attention import generate

    name = generate(SPECS[case]).name
    rows = [r for r in attention_rows if r["kernel"] == name and r["function"] == "forward" and r["sizes"]["d"] == d]
    assert rows, "nothing was compiled"
    good = [r for r in rows if r["mma"] == "wgmma" and r["config"]["BLOCK_M"] >= 64 and r["spills"] == 0]
    assert good, f"{case} D={d}: no wgmma config with BLOCK_M >= 64 and no spills: {rows}"
    assert 0 < good[0]["registers"] <= 255 and good[0]["shared_bytes"] > 0


@pytest.mark.parametrize("function", ["backward_dkdv", "backward_dq"])
def test_no_backward_kernel_has_only_spilling_configs(attention_rows, function):
    rows = [r for r in attention_rows if r["function"] == function]
    assert any(r["spills"] == 0 and r["mma"] != "none" for r in rows), rows


def test_kernels_command_checks_a_norm_kernel_for_sm90(tmp_path):
    (tmp_path / "kernels").mkdir()
    golden = GOLDEN_DIR / "llama_rms_bf16.py"
    (tmp_path / "kernels" / golden.name.replace("llama_rms_bf16", "fxfuse_rms_norm_golden")).write_text(golden.read_text())
    done = subprocess.run([sys.executable, "-m", "fxfuse.cli", "kernels", str(tmp_path), "--target", "sm_90", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["function"] for r in rows} == {"forward", "backward"}
    for r in rows:
        assert set(r) >= {"kernel", "function", "config", "registers", "spills", "shared_bytes", "mma"}
        assert set(r["config"]) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        assert r["mma"] == "none"  # a norm has no matrix product
    assert all(any(r["spills"] == 0 for r in rows if r["function"] == f) for f in ("forward", "backward"))


def test_bad_target_is_a_usage_error(capsys):
    from fxfuse.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["kernels", ".", "--target", "sm_12"])
    assert exit_.value.code == 2 and "unknown GPU target 'sm_12'" in capsys.readouterr().err


def test_mma_class_reads_the_ptx():
    assert mma_class("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert mma_class("mma.sync.aligned.m16n8k16.row.col") == "mma"
    assert mma_class("fma.rn.f32") == "none"


def test_decode_launches_check_the_split_key_forward_too():
    from fxfuse.runtime.static_check import _functions

    decode = {"d": 128, "dv": 128, "lq": 1, "lk": 8192, "dtype": "bfloat16"}
    assert "forward_split" in _functions(SPECS["causal_bf16"], decode, norm=False)
    assert "forward_split" not in _functions(SPECS["causal_bf16"], {**decode, "lq": 4096}, norm=False)
    rows = list(check([launch(SPECS["causal_bf16"], **decode)], "sm_90", functions=("forward_split",),
                      first_good=True, last_first=True))
    assert rows and rows[0]["kernel"].startswith("fxfuse_attention_split_")
    # 16 query rows are too few for Hopper's wgmma (64): mma.sync, without spills
    assert any(r["spills"] == 0 and r["mma"] == "mma" and r["config"]["BLOCK_M"] == 16 for r in rows), rows


def test_the_check_compiles_as_a_launch_specializes_so_the_key_loop_pipelines():
    """Triton specializes a launch on integer arguments that are multiples of 16; without that the
    compiler cannot prove aligned rows, copies synchronously and every stage count compiles alike.
    With it, each extra stage buffers another K and V tile in shared memory (64x128 bf16 each)."""
    from fxfuse.runtime.configs import LaunchConfig

    rows = list(check([launch(SPECS["causal_bf16"], d=128, dv=128, lq=4096, lk=4096, dtype="bfloat16")], "sm_90",
                      functions=("forward",), configs=[LaunchConfig(128, 64, 8, 2), LaunchConfig(128, 64, 8, 3)]))
    two, three = (next(r for r in rows if r["config"]["num_stages"] == s) for s in (2, 3))
    assert three["shared_bytes"] - two["shared_bytes"] == 2 * 64 * 128 * 2, (two, three)
    assert two["spills"] == three["spills"] == 0 and two["mma"] == three["mma"] == "wgmma"


def test_differential_kernels_compile_for_sm90_with_a_config_that_does_not_spill():
    """Both halves in one program hold two query (key) tiles and two row states: each of the
    differential forward and backward kernels, bf16 at head dim 128, has a config fxfuse tries
    that uses wgmma and does not spill."""
    import dataclasses

    spec = dataclasses.replace(SPECS["causal_bf16"], differential=True)
    rows = list(check([launch(spec, d=128, dv=128, lq=4096, lk=4096, dtype="bfloat16")], "sm_90",
                      functions=("forward", "backward_dkdv", "backward_dq"), first_good=True, last_first=True))
    for function in ("forward", "backward_dkdv", "backward_dq"):
        good = [r for r in rows if r["function"] == function and r["spills"] == 0 and r["mma"] == "wgmma"]
        assert good and 0 < good[0]["registers"] <= 255, (function, rows)
