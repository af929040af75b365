"""The HTML report: one self-contained page (no scripts, no network) with the summary, the fused
sites, the declined ones, every kernel's source (highlighted by Pygments) and the graph before and
after the passes; ``render_many`` puts several reports (every graph a ``Backend`` compiled) on one
page, each in its own section.

Graphs are drawn by Graphviz's ``dot`` when it is installed (best layout); otherwise by a layered
layout in pure Python (``fxfuse.graph_layout``), written as inline SVG. Each picture fits the page's
width, and a "full size" switch (CSS only) shows it at its own size, scrolled inside its frame.
"""
from __future__ import annotations

import dataclasses
import html
import operator
import shutil
import subprocess

import torch

from fxfuse.graph_layout import layered_layout
from fxfuse.log import get_logger

log = get_logger(__name__)

# Beyond this many nodes a picture is unreadable; larger graphs are cut to the rewritten nodes and
# their direct neighbours, and the caption says so.
MAX_NODES = 250
DOT_TIMEOUT_S = 30

FUSED, REPLACED = "fused", "replaced"
FILL = {FUSED: "#9be39b", REPLACED: "#ffc48a", None: "#f2f2f2"}
STROKE = {FUSED: "#1d7a1d", REPLACED: "#b35c00", None: "#888888"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 110em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.9em; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; border: 1px solid #ddd; }
.legend span { display: inline-block; padding: 0.1em 0.6em; margin-right: 1em; border: 1px solid #888; }
figure { margin: 0.3em 0 1.5em; overflow: auto; border: 1px solid #ddd; padding: 0.5em; max-height: 85vh; }
figure svg { display: block; margin: 0 auto; max-width: 100%; height: auto; }
.full-size:checked ~ figure svg { max-width: none; }
.picture label { font-size: 0.9em; color: #555; }
nav a { margin-right: 1em; }
.none { color: #777; font-style: italic; }
"""


@dataclasses.dataclass(frozen=True)
class DrawnNode:
    name: str
    label: str  # lines separated by "\n"
    tooltip: str
    mark: str | None  # FUSED, REPLACED or None


def _op_label(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            namespace = target.namespace
            base = target._schema.name.split("::")[-1]
            overload = "" if target._overloadname == "default" else f".{target._overloadname}"
            return f"{base}{overload}" if namespace == "aten" else f"{namespace}.{base}{overload}"
        return getattr(target, "__name__", str(target))
    if node.op == "placeholder":
        return f"input {node.name}"
    return node.op if node.op == "output" else f"{node.op} {node.name}"


def _shape_label(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    parts = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            dtype = str(v.dtype).replace("torch.", "")
            parts.append("×".join(str(s) for s in v.shape) + f" {dtype}")
    return ", ".join(parts)


def _is_fused_op(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "fxfuse"


def mark_nodes(before, after, fused_names=()):
    """Which nodes to highlight: in ``after`` the fused operators (and the items read from their
    outputs); in ``before`` the nodes the passes removed or replaced (absent from ``after``)."""
    after_marks: dict[str, str] = {}
    if after is not None:
        for node in _graph_nodes(after):
            if node.name in fused_names or _is_fused_op(node):
                after_marks[node.name] = FUSED
            elif node.target is operator.getitem and node.args[0].name in after_marks:
                after_marks[node.name] = FUSED
    before_marks: dict[str, str] = {}
    if before is not None and after is not None:
        kept = {n.name for n in _graph_nodes(after)}
        before_marks = {n.name: REPLACED for n in _graph_nodes(before) if n.name not in kept}
    return before_marks, after_marks


def _graph_nodes(g) -> list[torch.fx.Node]:
    """The nodes of a ``GraphModule`` or of a bare ``Graph`` (what a report keeps of the graph
    before the passes)."""
    return list(g.graph.nodes if isinstance(g, torch.fx.GraphModule) else g.nodes)


def _drawn_nodes(gm, marks: dict[str, str]) -> tuple[list[DrawnNode], list[tuple[str, str]], str]:
    """The nodes and edges to draw, cut down around the marked nodes when the graph is large."""
    nodes = _graph_nodes(gm)
    keep = {n.name for n in nodes}
    note = ""
    if len(nodes) > MAX_NODES:
        marked = [n for n in nodes if n.name in marks]
        keep = {n.name for n in marked}
        for n in marked:
            keep.update(a.name for a in n.all_input_nodes)
            keep.update(u.name for u in n.users)
        if not marked or len(keep) > MAX_NODES:
            keep = {n.name for n in nodes[:MAX_NODES]}
            note = f"showing the first {MAX_NODES} of {len(nodes)} nodes"
        else:
            note = f"showing {len(keep)} of {len(nodes)} nodes: the highlighted ones and their direct neighbours"
    drawn, edges = [], []
    for n in nodes:
        if n.name not in keep:
            continue
        mark = marks.get(n.name)
        label = _op_label(n) + (f"\n{n.name}" if mark == FUSED and n.op == "call_function" else "")
        shape = _shape_label(n)
        label += f"\n{shape}" if shape else ""
        trace = (n.meta.get("stack_trace") or "").strip().splitlines()
        tooltip = f"{n.name}: {n.format_node() or n.op}" + (f"\n{trace[-2].strip()}" if len(trace) >= 2 else "")
        drawn.append(DrawnNode(n.name, label, tooltip, mark))
        edges.extend((a.name, n.name) for a in n.all_input_nodes if a.name in keep)
    return drawn, edges, note


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _svg_with_dot(nodes: list[DrawnNode], edges: list[tuple[str, str]], uid: str) -> str | None:
    dot = shutil.which("dot")
    if dot is None:
        return None
    lines = ["digraph G {", "rankdir=TB;",
             'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             'edge [color="#777777", arrowsize=0.6];']
    for n in nodes:
        lines.append(f"{_dot_quote(n.name)} [label={_dot_quote(n.label)}, tooltip={_dot_quote(n.tooltip)}, "
                     f'fillcolor="{FILL[n.mark]}", color="{STROKE[n.mark]}"];')
    lines += [f"{_dot_quote(a)} -> {_dot_quote(b)};" for a, b in edges]
    lines.append("}")
    try:
        done = subprocess.run([dot, "-Tsvg"], input="\n".join(lines), capture_output=True, text=True,
                              timeout=DOT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("graphviz dot failed (%s); drawing with the built-in layered layout instead", err)
        return None
    svg = done.stdout
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inlined in HTML
    # dot names its elements graph0, node1, edge1...: the same in every picture, and inline SVG ids
    # share the page's namespace, so each picture's ids get their own prefix.
    return svg.replace(' id="', f' id="{uid}')


def _svg_layered(nodes: list[DrawnNode], edges: list[tuple[str, str]], uid: str) -> str:
    char_w, line_h, pad = 6.2, 13, 6
    size = {n.name: (max(len(line) for line in n.label.split("\n")) * char_w + 2 * pad,
                     len(n.label.split("\n")) * line_h + 2 * pad) for n in nodes}
    layout = layered_layout([n.name for n in nodes], size, edges)
    at, width, height = layout.at, layout.width, layout.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, sans-serif" font-size="10">',
           f'<defs><marker id="{uid}arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>']
    for a, b in edges:
        (xa, ya), (xb, yb) = at[a], at[b]
        points = [(xa, ya + size[a][1] / 2), *layout.bends[(a, b)], (xb, yb - size[b][1] / 2)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="#999" stroke-width="1" '
                   f'marker-end="url(#{uid}arrow)"/>')
    for n in nodes:
        (x, y), (w, h) = at[n.name], size[n.name]
        out.append(f'<g class="node"><title>{html.escape(n.tooltip)}</title>'
                   f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" '
                   f'fill="{FILL[n.mark]}" stroke="{STROKE[n.mark]}"/>')
        for i, line in enumerate(n.label.split("\n")):
            ty = y - h / 2 + pad + (i + 0.8) * line_h
            out.append(f'<text x="{x:.1f}" y="{ty:.1f}" text-anchor="middle">{html.escape(line)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


RENDERERS = ("auto", "dot", "layered")


def graph_svg(gm, marks: dict[str, str], renderer: str = "auto", uid: str = "g-") -> tuple[str, str]:
    """``(svg, caption note)``; ``renderer`` is "auto" (Graphviz's dot if installed, else the
    built-in layered layout), "dot" (falls back the same way) or "layered"; ``uid`` prefixes the
    picture's element ids, which must be unique on the page."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer {renderer!r}: expected one of {', '.join(RENDERERS)}")
    nodes, edges, note = _drawn_nodes(gm, marks)
    if not nodes:
        return "", "empty graph"
    svg = _svg_with_dot(nodes, edges, uid) if renderer in ("auto", "dot") else None
    drawn_by = "graphviz dot"
    if svg is None:
        svg, drawn_by = _svg_layered(nodes, edges, uid), "fxfuse's layered layout"
    return svg, "; ".join(filter(None, [note, f"drawn with {drawn_by}"]))


def _highlight(source: str) -> str:
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:
        return f"<pre>{html.escape(source)}</pre>"
    return highlight(source, PythonLexer(), HtmlFormatter(noclasses=True))  # inline styles: self-contained


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="none">{empty}</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _where(source: str, code: str) -> str:
    return f"<code>{html.escape(source)}</code>" + (f"<br><code>{html.escape(code)}</code>" if code else "")


def _body(report, before, after, renderer: str, prefix: str = "", level: int = 2) -> list[str]:
    """One report's sections. ``prefix`` keeps ids unique when a page holds several reports;
    ``level`` is the heading level of the sections (kernels one below)."""
    e = html.escape
    h, h_kernel = f"h{level}", f"h{level + 1}"
    match_rows = []
    for m in report.matches:
        kernel = report.kernel_for(m)
        link = f'<a href="#{prefix}kernel-{e(kernel.name)}"><code>{e(kernel.name)}</code></a>' if kernel else ""
        notes = "".join(f"<br><small>note: {e(note)}</small>" for note in m.notes)
        shape = f"<br><small>{e(m.shape)}</small>" if m.shape else ""
        match_rows.append([e(m.kind), _where(m.source, m.code), e(m.describe()) + shape + notes, link])
    miss_rows = [[e(m.kind), _where(m.source, m.code), e(m.reason)] for m in report.misses]
    has_graphs = before is not None or after is not None
    links = [("matches", "fused sites"), ("misses", "declined sites"), *([("graphs", "graphs")] if has_graphs else []),
             ("kernels", "generated kernels")]
    nav = "<nav>" + "".join(f'<a href="#{prefix}{target}">{words}</a>' for target, words in links) + "</nav>"
    parts = [
        f'<section id="{prefix}summary"><{h}>Summary</{h}><p>{e(report.summary())}</p>{nav}</section>',
        f'<section id="{prefix}matches"><{h}>Fused sites</{h}>',
        _table(["kind", "source", "spec", "kernel"], match_rows, "No site was fused."), "</section>",
        f'<section id="{prefix}misses"><{h}>Declined sites</{h}>',
        _table(["kind", "source", "reason"], miss_rows, "No candidate was declined."), "</section>",
    ]
    if has_graphs:
        fused_names = {m.node for m in report.matches}
        before_marks, after_marks = mark_nodes(before, after, fused_names)
        parts += [f'<section id="{prefix}graphs"><{h}>Graphs</{h}><p class="legend">'
                  f'<span style="background:{FILL[REPLACED]}">removed or replaced by the passes</span>'
                  f'<span style="background:{FILL[FUSED]}">fused operator</span></p>']
        for when, gm, marks in (("before", before, before_marks), ("after", after, after_marks)):
            if gm is None:
                continue
            uid = f"{prefix}{when}-"
            svg, note = graph_svg(gm, marks, renderer, uid=uid)
            parts.append(f'<div class="picture" id="{uid}picture"><{h_kernel}>Graph {when} the passes</{h_kernel}>'
                         f'<input type="checkbox" class="full-size" id="{uid}full"> <label for="{uid}full">full size '
                         f'(scroll inside the frame; hover a node for its code and source line)</label>'
                         f'<figure class="graph"><figcaption>{e(note)}</figcaption>{svg}</figure></div>')
        parts.append("</section>")
    # The kernels last: each is a long listing, and the graphs above are what a reader looks at first.
    parts.append(f'<section id="{prefix}kernels"><{h}>Generated kernels</{h}>')
    if not report.kernels:
        parts.append('<p class="none">No kernel was generated.</p>')
    for k in report.kernels:
        parts.append(f'<{h_kernel} id="{prefix}kernel-{e(k.name)}"><code>{e(k.name)}</code></{h_kernel}>'
                     f"<p>{e(k.spec)}<br><code>{e(k.path)}</code></p>{_highlight(k.source)}")
    parts.append("</section>")
    return parts


def _page(title: str, body: list[str]) -> str:
    e = html.escape
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
                      *body, "</body></html>"])


def render(report, before=None, after=None, renderer: str = "auto") -> str:
    """The whole page for one ``Report``; the graph section is left out when no graph is given.
    ``before``/``after`` are ``torch.fx.GraphModule``s or ``torch.fx.Graph``s."""
    return _page(report.title, _body(report, before, after, renderer))


def render_many(reports, title: str, renderer: str = "auto") -> str:
    """One page for several reports (every graph a ``fxfuse.Backend`` compiled): a list of them,
    then each one's sections and pictures, drawn from the graphs the reports keep."""
    e = html.escape
    if not reports:
        return _page(title, ['<p class="none">No graph was compiled.</p>'])
    overview = "".join(f'<li><a href="#graph{i}">{e(r.title)}</a>: {e(r.summary())}</li>' for i, r in enumerate(reports))
    body = [f'<section id="overview"><h2>Graphs compiled</h2><ul>{overview}</ul></section>']
    for i, report in enumerate(reports):
        body.append(f'<section id="graph{i}" class="compiled-graph"><h2>{e(report.title)}</h2>')
        body += _body(report, report.before, report.after, renderer, prefix=f"graph{i}-", level=3)
        body.append("</section>")
    return _page(title, body)
