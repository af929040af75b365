"""The text and HTML reports: every section is there, tables hold the sites, kernels are shown,
graphs are drawn as pictures with the rewritten nodes marked, and the page needs no network."""
import dataclasses
import logging
import shutil
import sys
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import fxfuse
from fxfuse import log as fxlog
from fxfuse import report_html
from fxfuse.capture import capture_module
from fxfuse.codegen.kernel import Kernel
from fxfuse.passes.pipeline import Match, Miss
from fxfuse.report import Report
from tests.norm_styles import LlamaStyleRMSNorm


class FusedAndDeclined(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = LlamaStyleRMSNorm(d)

    def forward(self, x):
        unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        return self.norm(x) + unbiased


class Page(HTMLParser):
    """Collects what the tests look at: section ids, table cells per section, svgs, text, urls."""

    def __init__(self):
        super().__init__()
        self.sections, self.cells, self.svgs, self.ids = [], {}, [], []
        self.fills, self.urls, self.tags = [], [], []
        self.text, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "svg":
            self.svgs.append(self.sections[-1])
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for name in ("fill", "style"):
            if name in attrs:
                self.fills.append(attrs[name])
        for name in ("href", "src", "xlink:href"):
            if attrs.get(name) and not attrs[name].startswith("#"):
                self.urls.append(attrs[name])
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.setdefault(self.sections[-1], []).append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def rewritten():
    model, x = FusedAndDeclined(), torch.randn(2, 3, 16)
    res = fxfuse.rewrite(model, (x,))
    return res, capture_module(model, (x,)).gm


@pytest.mark.parametrize("renderer", ["layered", "dot"])
def test_html_has_every_section_and_both_graphs(rewritten, renderer):
    if renderer == "dot" and shutil.which("dot") is None:
        pytest.skip("graphviz `dot` is not installed; the layered case covers the fallback")
    res, before = rewritten
    page = _parse(res.report_data.html(before=before, after=res.graph, renderer=renderer))
    assert page.sections == ["summary", "matches", "misses", "graphs", "kernels"]
    # Fused-site row: kind, source with the user's line, spec in words, kernel link.
    kind, source, spec, kernel = page.cells["matches"]
    assert kind == "rms_norm" and "norm_styles.py:" in source and spec == res.matches[0].describe()
    assert kernel == res.kernels[0].name and f"kernel-{kernel}" in page.ids
    assert page.cells["misses"][0] == "rms_norm/layer_norm" and "unbiased" in page.cells["misses"][2]
    assert "@triton.jit" in "".join(page.text)
    # Two pictures, before and after, with the replaced and the fused nodes coloured.
    assert page.svgs == ["graphs", "graphs"]
    assert any(report_html.FILL[report_html.REPLACED] in f for f in page.fills)
    assert any(report_html.FILL[report_html.FUSED] in f for f in page.fills)
    expected = "graphviz dot" if renderer == "dot" else "fxfuse's layered layout"
    assert "".join(page.text).count(f"drawn with {expected}") == 2
    assert len(page.ids) == len(set(page.ids))  # the two pictures' element ids do not collide
    # Self-contained: no scripts, stylesheets or images fetched from anywhere.
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert page.urls == []


def test_marks_follow_the_rewrite(rewritten):
    res, before = rewritten
    before_marks, after_marks = report_html.mark_nodes(before, res.graph, {m.node for m in res.matches})
    assert res.matches[0].node in after_marks
    after_names = {n.name for n in res.graph.graph.nodes}
    replaced = [n for n in before.graph.nodes if n.name in before_marks]
    assert replaced and all(n.name not in after_names for n in replaced)
    assert any(n.target == torch.ops.aten.rsqrt.default for n in replaced)  # the norm's own ops


def test_large_graph_is_cut_to_the_rewritten_neighbourhood(rewritten, monkeypatch):
    res, _ = rewritten
    monkeypatch.setattr(report_html, "MAX_NODES", 6)
    _, after_marks = report_html.mark_nodes(None, res.graph, {m.node for m in res.matches})
    svg, note = report_html.graph_svg(res.graph, after_marks, renderer="layered")
    assert "showing" in note and "highlighted" in note
    assert svg.count("<rect") < len(res.graph.graph.nodes)


def test_kernel_source_is_escaped_without_pygments(rewritten, monkeypatch):
    res, _ = rewritten
    monkeypatch.setitem(sys.modules, "pygments", None)  # makes `import pygments` fail
    page_text = dataclasses.replace(res.report_data, before=None, after=None).html()
    assert "<pre># Generated by fxfuse" in page_text
    assert "graphs" not in _parse(page_text).sections  # no graph given, no graph section


def test_rewrite_keeps_both_graphs_for_the_page(rewritten):
    """``html()`` with no arguments draws the graphs the report kept: the one before the passes
    is a copy taken before they ran (it still has the norm's rsqrt), the one after is ``res.graph``."""
    res, _ = rewritten
    assert res.report_data.after is res.graph
    before_ops = {n.target for n in res.report_data.before.nodes}
    assert torch.ops.aten.rsqrt.default in before_ops and torch.ops.fxfuse.norm.default not in before_ops
    page = _parse(res.report_data.html(renderer="layered"))
    assert page.svgs == ["graphs", "graphs"]
    assert any(report_html.FILL[report_html.REPLACED] in f for f in page.fills)


class GraphBreak(nn.Module):
    """A norm on each side of a graph break: torch.compile hands the backend two graphs."""

    def __init__(self, d=16):
        super().__init__()
        self.rms, self.ln = LlamaStyleRMSNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.rms(x)
        torch._dynamo.graph_break()
        return self.ln(h)


@pytest.fixture(scope="module")
def compiled_with_a_break():
    backend = fxfuse.Backend()
    model, x = GraphBreak(), torch.randn(2, 3, 16)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    return backend


@pytest.mark.parametrize("renderer", ["layered", "dot"])
def test_backend_page_has_every_compiled_graph(compiled_with_a_break, tmp_path, renderer):
    if renderer == "dot" and shutil.which("dot") is None:
        pytest.skip("graphviz `dot` is not installed; the layered case covers the fallback")
    backend = compiled_with_a_break
    assert len(backend.reports) == 2
    path = tmp_path / "all.html"
    text = backend.html(path, renderer=renderer)
    assert path.read_text() == text
    page = _parse(text)
    for i, kind in enumerate(["rms_norm", "layer_norm"]):
        sections = [f"graph{i}", *(f"graph{i}-{s}" for s in ["summary", "matches", "misses", "graphs", "kernels"])]
        assert [s for s in page.sections if s.startswith(f"graph{i}")] == sections
        assert page.cells[f"graph{i}-matches"][0] == kind
        assert page.svgs.count(f"graph{i}-graphs") == 2  # before and after the passes
        kernel = backend.reports[i].kernels[0].name
        assert f"graph{i}-kernel-{kernel}" in page.ids and page.cells[f"graph{i}-matches"][3] == kernel
    # Ids unique on the page (the pictures' own too): links and arrowheads point at the right element.
    assert len(page.ids) == len(set(page.ids))
    assert any(report_html.FILL[report_html.FUSED] in f for f in page.fills)
    assert "script" not in page.tags and page.urls == []


@dataclasses.dataclass(frozen=True)
class OtherSpec:
    heads: int

    def describe(self) -> str:
        return f"attention, {self.heads} heads, causal"


def test_any_pattern_family_is_reported():
    """A report reads only kind/source/describe(): a new family shows up with no change here."""
    spec = OtherSpec(4)
    kernel = Kernel(name="fxfuse_attention_0123", source="# Generated by fxfuse\n<x>", path="/k.py", spec=spec.describe())
    report = Report([Match("attention", "model.py:7", spec, "attn_0", "p = q @ k.T")],
                    [Miss("attention", "model.py:9", "softmax over the query axis")], [kernel], 0.1, "t")
    text = report.text()
    assert "attention at model.py:7 -- attention, 4 heads, causal -> kernel fxfuse_attention_0123" in text
    assert "softmax over the query axis" in text and "1 fused (1 attention)" in text
    page = _parse(report.html())
    assert page.cells["matches"] == ["attention", "model.py:7p = q @ k.T", spec.describe(), kernel.name]
    assert "<x>" not in report.html()  # kernel source is escaped, never pasted in as markup


def test_fxfuse_log_raises_the_level_and_reports_log(monkeypatch):
    logger = logging.getLogger("fxfuse")
    saved = (logger.level, list(logger.handlers), logger.propagate, fxlog._handler)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    try:
        monkeypatch.setenv("FXFUSE_LOG", "debug")
        fxlog.configure_from_env()
        assert logger.level == logging.DEBUG
        logger.addHandler(Keep())
        Report([], [Miss("rms_norm", "m.py:1", "eps outside")], [], 0.0, "logged")
        messages = [r.getMessage() for r in records]
        assert any("logged: 1 candidate" in m for m in messages)
        assert any("declined rms_norm at m.py:1: eps outside" in m for m in messages)
        monkeypatch.setenv("FXFUSE_LOG", "loud")
        with pytest.warns(UserWarning, match="unknown fxfuse log level"):
            fxlog.configure_from_env()
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
        fxlog._handler = saved[3]


def test_page_is_drawn_without_numpy_or_networkx(rewritten, monkeypatch):
    # The plain install has neither (networkx's layouts need numpy): the built-in layout does not.
    res, before = rewritten
    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.setitem(sys.modules, "networkx", None)
    page = _parse(res.report_data.html(before=before, after=res.graph, renderer="auto" if shutil.which("dot") is None
                                       else "layered"))
    assert page.svgs == ["graphs", "graphs"]


def test_layered_layout_puts_inputs_by_their_users_and_never_overlaps():
    from fxfuse.graph_layout import layered_layout

    # A chain a -> b -> c -> d with a parameter p read only by d, and a skip edge a -> d.
    names = ["a", "p", "b", "c", "d"]
    sizes = {n: (60.0, 20.0) for n in names}
    edges = [("a", "b"), ("b", "c"), ("c", "d"), ("p", "d"), ("a", "d")]
    layout = layered_layout(names, sizes, edges)
    y = {n: layout.at[n][1] for n in names}
    assert y["a"] < y["b"] < y["c"] < y["d"]
    assert y["p"] == y["c"]  # one layer above its user, not in the top row with the graph's input
    assert len(layout.bends[("a", "d")]) == 2  # the skip edge bends once per layer it crosses
    row = sorted(layout.at[n][0] for n in names if y[n] == y["c"])
    assert all(right - left >= 60.0 for left, right in zip(row, row[1:]))  # boxes side by side, apart
    assert all(0 <= x - 30 and x + 30 <= layout.width for x, _ in layout.at.values())
    assert layered_layout(names, sizes, edges) == layout  # deterministic
