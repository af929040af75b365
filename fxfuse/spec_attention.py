"""AttentionSpec: what exactly one fused attention site computes.

The site is ``out = softmax(steps(q @ k^T)) @ v`` with q, k, v in ``(B, H, L, D)`` layout. The
``steps`` are the elementwise operations the user's code applies to the scores between the two
products, in program order, each with the dtype its result had in the user's graph, so that the
CPU reference reproduces the user's roundings and the kernel knows where they happen. Extra tensor
inputs (boolean masks, additive masks and biases) are listed in ``inputs``; a step names its input
by index. Like NormSpec it travels through the graph as a JSON string.
"""
from __future__ import annotations

import dataclasses
import json
import math

from fxfuse.index_expr import relabel_loads, text, tupled
from fxfuse.spec import _SHORT, NormSpec

# Step kinds on the scores ``s`` (all elementwise, all keep the score shape):
#   "mul"  s * value            (a Python scalar from the graph), or s * inputs[input] when
#          input >= 0 (a factor tensor: a per-head temperature, a 0-dim scale tensor)
#   "div"  s / value            (kept apart from "mul": the reference divides as the user did),
#          or s / inputs[input]
#   "fill" s = value where inputs[input] is True (or, with invert, where it is False); input -1
#          is the causal mask, True where key j is after query i (j > i + Lk - Lq), with a
#          ``window`` also where it is window or more keys before (a sliding window), which the
#          pass sets only when it proved a constant mask of that form from its values; with an
#          ``expr`` (input -1), s = value where that index expression over (b, h, i, j) is True
#   "add"  s + inputs[input]    (additive mask or bias, broadcast to (B, H, Lq, Lk)), s + value with
#          input -1 and no ``expr`` (a Python scalar: sigmoid attention's -log(L)), or with an
#          ``expr`` (input -1), s + that index expression (see fxfuse.index_expr; it may load
#          inputs of kind "head": (1|B, 1|H, 1, 1) tensors read once per program), or with both
#          an input and an ``expr``, s + (inputs[input] + expr), the sum in the step's input
#          dtype as the user's code rounded it (Swin's relative-position bias plus its shift mask
#          computed from positions); the input's gradient is that of a plain "add"
#   "cast" s.to(dtype)
#   "tanh" torch.tanh(s)        (with a "div" before and a "mul" after: logit soft-capping)
STEP_OPS = ("mul", "div", "fill", "add", "cast", "tanh")


@dataclasses.dataclass(frozen=True)
class ScoreStep:
    op: str
    dtype: str  # the scores' dtype after this step
    value: float = 0.0
    input: int = -1
    invert: bool = False  # "fill" only: fill where the mask is False (torch.where(mask, s, value))
    window: int = 0  # causal "fill" only: also hide key j when j <= i + Lk - Lq - window (sliding window)
    expr: tuple | None = None  # "fill"/"add" with input -1 (or "add" with an input): an index expression

    @property
    def causal(self) -> bool:
        return self.op == "fill" and self.input == -1 and self.expr is None


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention site.

    score_dtype:   dtype ``q @ k^T`` is rounded to: q's and k's dtype, or float32 for a 16-bit
                   ``baddbmm``/``addmm`` site, whose product is accumulated in float32 and rounded
                   once, after its scale and bias steps (a "cast" step then follows them).
    steps:         score operations in program order (see STEP_OPS).
    prob_dtype:    dtype of the probabilities as they enter the value product (after any cast of
                   the softmax's result; the softmax runs in the dtype of the last step).
    inputs:        per extra tensor, "mask" (boolean), "bias" (added), "factor" (multiplies or divides),
                   "head" (a (1|B, 1|H, 1, 1) tensor an index expression loads, e.g. ALiBi's slopes) or
                   "sink" (the per-row sink logits, see ``sinks``).
    kv_groups:     query heads per key/value head (grouped-query attention): k and v have H / kv_groups
                   heads and are read in place, query head h using kv head h // kv_groups.
    dropout:       the rate of dropout on the probabilities (training): each probability, independently,
                   is kept with probability 1 - dropout and then divided by 1 - dropout, else zeroed;
                   the softmax's max and sum are those of the undropped scores. The operator draws
                   the mask from a seed tensor it is given (see fxfuse.ops.attention).
    sinks:         index of the input holding each query row's sink logit (gpt-oss's attention sinks,
                   a (.., Lq, 1) column, kind "sink"), or -1: the softmax runs over the row's scores and
                   that logit, whose probability is then dropped (it has no value row), so it enters
                   only the row's max and denominator.
    normalizer:    "softmax" (over the keys), or "sigmoid": probabilities are ``sigmoid(scores)``,
                   elementwise, with no row normalisation (Ramapuram et al., sigmoid self-attention).
    safe_softmax:  the softmax is ``aten._safe_softmax`` (SDPA's math decomposition, Inductor's
                   patterns 29/30): a query row whose every score is -inf gives probabilities 0
                   (so output 0 and gradients 0) where a plain softmax gives NaN.
    rope_q/rope_k: rotary position embedding applied to q (k) as the operator loads it, "" for none:
                   "half" is ``x * cos + rotate_half(x) * sin`` with rotate_half = cat(-x2, x1) of
                   the halves of the head dim, "interleaved" the same rotation on pairs (2j, 2j+1)
                   (complex multiplication, ``view_as_complex``); cos and sin are (1|B, L, D) tables
                   given to ``fxfuse.attention_rope`` (see fxfuse.ops.attention_rope).
    size_mask:     index of a boolean mask input (a "fill" step's) whose values the pass proved are
                   a function of the call's sizes alone, each of which is a dim of the mask (built
                   from ``arange`` and the lengths, as Hugging Face's mask builders do at symbolic
                   sizes), or -1. Once per mask shape the operator compares its values with the
                   causal and sliding-window rules; where one holds it runs that rule instead (no
                   mask read, hidden tiles skipped: fxfuse.ops.size_masks).
    size_key:      with ``size_mask``, a digest of the function from the mask's shape to its values
                   (its subgraph): masks with one key share their verdicts.
    differential:  differential attention (Ye et al., Differential Transformer): the site is
                   ``attn(q1, k1, v) - lambda * attn(q2, k2, v)``, both halves computing this spec's
                   steps with the same extra tensors and sharing v, lambda a scalar or per-(batch,
                   head) tensor (see fxfuse.ops.attention_differential); False: one attention.
    norm_q/norm_k: QK-norm: a NormSpec (its JSON, fxfuse.spec) normalising each row of q (k) over the
                   head dim as the operator loads it, before any RoPE, "" for none; its parameters
                   follow the cos/sin tables in ``fxfuse.attention_rope``'s ``tables`` (see
                   fxfuse.ops.attention_qk_norm).
    windows:       Swin's (shifted) windows addressed by index, () for none: (ws, shift, Hp, Wp). The
                   site is one attention per ws x ws window of a (B, Hp, Wp) image rolled by -shift
                   on both axes (``torch.roll(x, (-shift, -shift), (1, 2))``, then the window
                   partition); window w = b * nW + wy * (Wp / ws) + wx, its token t at image position
                   ``((wy*ws + t // ws + shift) % Hp, (wx*ws + t % ws + shift) % Wp)``. q, k, v are then
                   given as (B, Hp, Wp, H, D) image tensors and the output is (B, Hp, Wp, H, Dv) at
                   the un-shifted positions (see fxfuse.ops.attention_windows); every other field
                   reads the (B * nW, H, N, N) scores as without windows.
    """

    score_dtype: str
    steps: tuple[ScoreStep, ...] = ()
    prob_dtype: str = "float32"
    inputs: tuple[str, ...] = ()
    kv_groups: int = 1
    dropout: float = 0.0
    safe_softmax: bool = False
    rope_q: str = ""
    rope_k: str = ""
    sinks: int = -1
    normalizer: str = "softmax"
    size_mask: int = -1
    size_key: str = ""
    differential: bool = False
    norm_q: str = ""
    norm_k: str = ""
    windows: tuple = ()

    @property
    def softmax_dtype(self) -> str:
        return self.steps[-1].dtype if self.steps else self.score_dtype

    @property
    def causal(self) -> bool:
        return any(step.causal for step in self.steps)

    @property
    def out_dtype(self) -> str:
        # The value product multiplies the probabilities by v, which must share their dtype.
        return self.prob_dtype

    def _softcap_steps(self) -> set[int]:
        """Indices of the steps that form ``c * tanh(s / c)`` triples (logit soft-capping)."""
        found = set()
        for k in range(1, len(self.steps) - 1):
            before, tanh, after = self.steps[k - 1:k + 2]
            if tanh.op == "tanh" and before.op == "div" and after.op == "mul" and before.input == after.input == -1 \
                    and before.value == after.value:
                found |= {k - 1, k, k + 1}
        return found

    @property
    def scale(self) -> float:
        """The product of the scalar factors outside soft-capping (for reports)."""
        s, capped = 1.0, self._softcap_steps()
        for k, step in enumerate(self.steps):
            if step.op == "mul" and step.input == -1 and k not in capped:
                s *= step.value
            elif step.op == "div" and step.input == -1 and k not in capped:
                # s / 0.0 as torch computes it (a site may divide by sqrt(D) with D = 0): inf or NaN.
                s = s / step.value if step.value else math.copysign(math.inf, s) if s else math.nan
        return s

    def to_json(self) -> str:
        # json writes inf as Infinity, which json.loads reads back: fill values may be -inf.
        raw = dataclasses.asdict(self)
        if not self.dropout:  # left out at its default: sites without dropout keep their JSON and kernel names
            del raw["dropout"]
        if not self.safe_softmax:  # likewise: only safe-softmax sites name it
            del raw["safe_softmax"]
        for field in ("rope_q", "rope_k", "norm_q", "norm_k"):  # likewise: only RoPE / QK-norm sites name them
            if not raw[field]:
                del raw[field]
        if self.sinks < 0:  # likewise (new fields stay out of the JSON at their defaults: same spec, same bytes)
            del raw["sinks"]
        if self.normalizer == "softmax":
            del raw["normalizer"]
        if self.size_mask < 0:
            del raw["size_mask"], raw["size_key"]
        if not self.differential:
            del raw["differential"]
        if not self.windows:
            del raw["windows"]
        for step in raw["steps"]:
            if step["expr"] is None:  # specs without expressions keep their JSON (and kernel names)
                del step["expr"]
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "AttentionSpec":
        raw = json.loads(text)
        raw["steps"] = tuple(ScoreStep(**{**s, "expr": tupled(s.get("expr"))}) for s in raw["steps"])
        raw["inputs"] = tuple(raw["inputs"])
        if "windows" in raw:
            raw["windows"] = tuple(raw["windows"])
        return AttentionSpec(**raw)

    # The fields ``without_input`` renumbers. A field added later that names an input by index
    # must be renumbered there too (``without_input`` declines specs with fields it does not know).
    _RENUMBERED = {"steps", "inputs", "sinks", "size_mask"}
    _UNINDEXED = {"score_dtype", "prob_dtype", "kv_groups", "dropout", "safe_softmax", "rope_q", "rope_k",
                  "normalizer", "size_key", "norm_q", "norm_k"}

    def without_input(self, index: int) -> "AttentionSpec | None":
        """The spec with input ``index`` removed and the later inputs renumbered, once no step reads
        it; None when a field this method does not know is set (it might name inputs)."""
        for f in dataclasses.fields(self):
            if f.name not in self._RENUMBERED | self._UNINDEXED and getattr(self, f.name) != f.default:
                return None
        if any(step.input == index for step in self.steps) or self.sinks == index:
            raise ValueError(f"input {index} is still read by the spec; replace its steps first")
        moved = {k: k - (k > index) for k in range(len(self.inputs)) if k != index}
        steps = tuple(dataclasses.replace(
            step, input=moved[step.input] if step.input >= 0 else -1,
            expr=relabel_loads(step.expr, moved) if step.expr is not None else None) for step in self.steps)
        return dataclasses.replace(
            self, steps=steps, inputs=self.inputs[:index] + self.inputs[index + 1:],
            sinks=moved[self.sinks] if self.sinks >= 0 else -1,
            size_mask=moved[self.size_mask] if self.size_mask >= 0 and self.size_mask != index else -1,
            size_key=self.size_key if self.size_mask >= 0 and self.size_mask != index else "")

    def describe(self) -> str:
        """The spec in words: ``attention: scale 0.5, masked_fill(-inf), + bias, softmax in f32 -> bf16``."""
        parts = [f"scores in {_SHORT[self.score_dtype]}"]
        scale_written, capped = False, self._softcap_steps()
        for k, step in enumerate(self.steps):
            if k in capped:
                if step.op == "tanh":
                    parts.append(f"softcap {self.steps[k + 1].value:g}")
            elif step.op in ("mul", "div") and step.input >= 0:
                parts.append(f"{'*' if step.op == 'mul' else '/'} factor{step.input}")
            elif step.op in ("mul", "div"):
                if not scale_written:
                    parts.append(f"scale {self.scale:.6g}")
                    scale_written = True
            elif step.expr is not None and step.input >= 0:
                parts.append(f"+ ({self.inputs[step.input]}{step.input} + {text(step.expr)})")
            elif step.expr is not None:
                parts.append(f"masked_fill({text(step.expr)}, {step.value:g})" if step.op == "fill"
                             else f"+ bias ({text(step.expr)})")
            elif step.op == "fill":
                if step.input == -1:
                    window = f", window {step.window}" if step.window else ""
                    parts.append(f"causal{window} (fill {step.value:g})")
                else:
                    parts.append(f"masked_fill({'~' if step.invert else ''}mask{step.input}, {step.value:g})")
            elif step.op == "add" and step.input == -1:
                parts.append(f"+ {step.value:g}")
            elif step.op == "add":
                parts.append(f"+ {self.inputs[step.input]}{step.input}")
            elif step.op == "tanh":
                parts.append("tanh")
            else:
                parts.append(f"cast {_SHORT[step.dtype]}")
        if not scale_written:
            parts.append("no scale")
        if self.kv_groups > 1:
            parts.append(f"GQA {self.kv_groups} query heads per kv head")
        if self.normalizer == "sigmoid":
            parts.append(f"sigmoid in {_SHORT[self.softmax_dtype]} (no row normalisation)")
        else:
            parts.append(f"softmax in {_SHORT[self.softmax_dtype]}")
        if self.sinks >= 0:
            parts.append(f"sink logit{self.sinks} per row")
        if self.safe_softmax:
            parts.append("safe softmax (fully masked rows give 0)")
        if self.size_mask >= 0:
            parts.append(f"mask{self.size_mask} checked once per size against the causal rule")
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        rotated = [f"{name} ({style})" for name, style in (("q", self.rope_q), ("k", self.rope_k)) if style]
        if rotated:
            parts.append("RoPE on " + " and ".join(rotated))
        if self.differential:
            parts.append("differential (two softmaxes sharing v: o1 - lambda * o2)")
        if self.windows:
            ws, shift, hp, wp = self.windows
            parts.append(f"windows {ws}x{ws} of a {hp}x{wp} image" + (f" shifted by {shift}" if shift else "")
                         + " addressed by index")
        for name, norm in (("q", self.norm_q), ("k", self.norm_k)):
            if norm:
                order = " before RoPE" if getattr(self, f"rope_{name}") else ""
                parts.append(f"QK-norm on {name}{order} ({NormSpec.from_json(norm).describe()})")
        parts.append(f"-> {_SHORT[self.out_dtype]}")
        return "attention: " + ", ".join(parts)
