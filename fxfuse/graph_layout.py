"""A layered drawing of a DAG in pure Python, for the HTML report when Graphviz is not installed.

The usual layered (Sugiyama) recipe, kept small: each node goes one layer above its first user
(a parameter or a mask built from scratch sits by the op that reads it, instead of in one wide top
row with every parameter of the model); an edge that spans several layers passes through
a bend point in each, so it is routed around the boxes; the order within each layer is improved by
a few barycenter sweeps (fewer crossings), and each node is then pulled towards the nodes it connects
to, without overlaps. Deterministic: the same graph gives the same picture.
"""
from __future__ import annotations

import dataclasses

GAP_X, GAP_Y, BEND_W = 16.0, 34.0, 8.0  # px between boxes, between layers; width kept for an edge's bend
SWEEPS = 4


@dataclasses.dataclass
class Layout:
    """Box centres ``at[name] = (x, y)``, each edge's polyline (its bend points, top to bottom,
    between the two boxes) and the picture's size."""

    at: dict[str, tuple[float, float]]
    bends: dict[tuple[str, str], list[tuple[float, float]]]
    width: float
    height: float


def _layers(names: list[str], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> dict[str, int]:
    layer: dict[str, int] = {}
    for n in names:  # names are in a topological order (an FX graph's node order)
        layer[n] = 1 + max((layer[p] for p in preds[n]), default=-1) if preds[n] else 0
    # Then as late as possible: every node just above its first user. A parameter, its transpose
    # and a mask built from scratch then sit next to the op that reads them, not in the top rows
    # with long edges down to it; the longest chain keeps its layers.
    for n in reversed(names):
        if succs[n]:
            layer[n] = min(layer[s] for s in succs[n]) - 1
    return layer


def layered_layout(names: list[str], sizes: dict[str, tuple[float, float]], edges: list[tuple[str, str]],
                   margin: float = 20.0) -> Layout:
    """Lay out the nodes ``names`` (topologically ordered; ``sizes[name] = (w, h)``) and ``edges``."""
    preds: dict[str, list[str]] = {n: [] for n in names}
    succs: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    layer = _layers(names, preds, succs)
    n_layers = 1 + max(layer.values(), default=0)

    # Each long edge becomes a chain through one bend point per layer it crosses.
    rows: list[list[object]] = [[] for _ in range(n_layers)]
    for n in names:
        rows[layer[n]].append(n)
    up: dict[object, list[object]] = {n: [] for n in names}
    down: dict[object, list[object]] = {n: [] for n in names}
    chains: dict[tuple[str, str], list[tuple]] = {}
    for a, b in edges:
        prev, chain = a, []
        for k in range(layer[a] + 1, layer[b]):
            bend = ("bend", a, b, k)
            rows[k].append(bend)
            up[bend], down[bend] = [prev], []
            down[prev].append(bend)
            chain.append(bend)
            prev = bend
        up[b].append(prev)
        down[prev].append(b)
        chains[(a, b)] = chain

    def width(item) -> float:
        return BEND_W if isinstance(item, tuple) else sizes[item][0]

    # Order: barycenter sweeps, down then up.
    index = {item: i for row in rows for i, item in enumerate(row)}
    for sweep in range(SWEEPS):
        order = range(1, n_layers) if sweep % 2 == 0 else range(n_layers - 2, -1, -1)
        for k in order:
            near = up if sweep % 2 == 0 else down
            def key(item, k=k, near=near):
                linked = [index[o] for o in near[item]]
                return sum(linked) / len(linked) if linked else index[item]
            rows[k].sort(key=key)
            index.update((item, i) for i, item in enumerate(rows[k]))

    # Coordinates: pack each row, then pull each item towards its neighbours' mean, keeping order.
    x: dict[object, float] = {}
    for row in rows:
        at = 0.0
        for item in row:
            x[item] = at + width(item) / 2
            at += width(item) + GAP_X
    for sweep in range(SWEEPS):
        order = range(1, n_layers) if sweep % 2 == 0 else range(n_layers - 2, -1, -1)
        for k in order:
            near = up if sweep % 2 == 0 else down
            row = rows[k]
            want = [sum(x[o] for o in near[item]) / len(near[item]) if near[item] else x[item] for item in row]
            placed = []
            for i, item in enumerate(row):
                lo = placed[-1] + (width(row[i - 1]) + width(item)) / 2 + GAP_X if i else float("-inf")
                placed.append(max(want[i], lo))
            # Overlaps pushed the row right of where it wants to be: shift it back by the mean excess.
            shift = sum(p - w for p, w in zip(placed, want)) / len(row) if row else 0.0
            for item, p in zip(row, placed):
                x[item] = p - shift
    left = min((x[item] - width(item) / 2 for row in rows for item in row), default=0.0)
    right = max((x[item] + width(item) / 2 for row in rows for item in row), default=0.0)

    row_h = [max((sizes[i][1] for i in row if not isinstance(i, tuple)), default=0.0) for row in rows]
    y_row, at = [], margin
    for h in row_h:
        y_row.append(at + h / 2)
        at += h + GAP_Y
    place = {item: (x[item] - left + margin, y_row[k]) for k, row in enumerate(rows) for item in row}
    return Layout(at={n: place[n] for n in names},
                  bends={edge: [place[b] for b in chain] for edge, chain in chains.items()},
                  width=right - left + 2 * margin, height=at - GAP_Y + margin)
