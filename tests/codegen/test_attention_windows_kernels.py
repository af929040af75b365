"""The window-addressing attention kernels (fxfuse.codegen.attention_windows) as text and as a GPU
would compile them: every operand's batch-and-row address is replaced by ``window_row`` (no
(B * nW, H, N, D) address left), the plain kernels' bytes are unchanged, and the three functions
compile for sm_90 (Triton's compiler and ptxas, no GPU) with wgmma and no spills at Swin-T's
sizes (window 7: 49 rows, head dim 32, a 56x56 image shifted by 3)."""
import dataclasses

from fxfuse.codegen.attention import generate
from fxfuse.runtime.static_check import check, launch
from fxfuse.spec_attention import AttentionSpec, ScoreStep

SWIN_T = AttentionSpec(score_dtype="bfloat16", steps=(ScoreStep("mul", "bfloat16", 32 ** -0.5),
                                                       ScoreStep("add", "bfloat16", input=0)),
                       inputs=("bias",), prob_dtype="bfloat16")
WINDOWED = dataclasses.replace(SWIN_T, windows=(7, 3, 56, 56))


def test_window_kernels_address_every_operand_by_window_row():
    plain, windowed = generate(SWIN_T).source, generate(WINDOWED).source
    assert "window_row" not in plain
    body = windowed.split("def window_row", 1)[1]
    assert "(wy * 7 + t // 7 + 3) % 56" in windowed and "off_b * stride_" not in windowed
    # q, k, v, dO loads and the output, dq, dk, dv stores all go through it
    for operand in ("Q + window_row", "K + window_row", "V + window_row", "O + window_row", "DO + window_row",
                    "DQ + window_row", "DK + window_row", "DV_OUT + window_row"):
        assert operand in body, operand
    # Everything but the addresses (and the kernel's name and spec comment) is the plain kernels' text.
    helper = windowed.split("import triton.language as tl", 1)[1].split("@triton.jit\ndef fxfuse", 1)[0]
    windowed_lines = windowed.replace(helper, "\n\n\n", 1).splitlines()
    plain_lines = plain.replace(generate(SWIN_T).name, generate(WINDOWED).name).splitlines()
    assert len(windowed_lines) == len(plain_lines)
    changed = [(a, b) for a, b in zip(plain_lines, windowed_lines) if a != b]
    assert all("window_row" in b or a.startswith("# ") for a, b in changed), changed
    # one per operand address of the plain kernels (loads, the output store) and per dq/dk/dv store
    assert sum("window_row" in b for _, b in changed) == plain.count("off_b * stride_") + plain.count("+ rows * D")

def test_window_kernels_compile_for_sm90_with_wgmma_and_no_spills():
    rows = list(check([launch(WINDOWED, d=32, dv=32, lq=49, lk=49, dtype="bfloat16")], "sm_90",
                      first_good=True, last_first=True))
    for function in ("forward", "backward_dkdv", "backward_dq"):
        good = [r for r in rows if r["function"] == function and r["spills"] == 0 and r["mma"] == "wgmma"]
        assert good and 0 < good[0]["registers"] <= 255, [r for r in rows if r["function"] == function]
