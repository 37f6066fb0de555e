"""Pictures for study: the computation graph as Graphviz DOT, attention maps as text and SVG.

Nothing here needs a plotting library: DOT and SVG are text, and the terminal heatmap
is made of block characters.
"""
from xml.sax.saxutils import escape

from . import backend
from .engine import Tensor

SHADES = " ░▒▓█"  # from no weight to all of it


def _tensor_label(tensor, names):
    name = names.get(id(tensor))
    shape = "x".join(str(n) for n in tensor.shape) or "scalar"
    return f"{name}\\n{shape}" if name else f"{shape} {tensor.dtype}"


def to_dot(tensor, names=None):
    """The graph that computed `tensor`, as Graphviz DOT text (render with `dot -Tsvg`).

    Tensors are ellipses (leaves that require grad are filled), ops are boxes. `names`
    maps tensors to labels, for example `{p: n for n, p in model.named_parameters()}`.
    The graph must not have been released by backward() (use retain_graph=True).
    """
    names = {id(t): label for t, label in (names or {}).items()}
    lines = ["digraph tinyattn {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    seen_tensors, seen_functions = set(), set()

    def add_tensor(t):
        if id(t) not in seen_tensors:
            seen_tensors.add(id(t))
            style = ', style=filled, fillcolor="#cfe2ff"' if t.is_leaf and t.requires_grad else ""
            lines.append(f'  t{id(t)} [shape=ellipse, label="{_tensor_label(t, names)}"{style}];')

    add_tensor(tensor)
    stack = [tensor]
    while stack:
        output = stack.pop()
        function = output.grad_fn
        if function is None or id(function) in seen_functions:
            continue
        if function.inputs is None:
            raise RuntimeError("to_dot() needs the graph, but backward() already released it; call backward(retain_graph=True) first")
        seen_functions.add(id(function))
        lines.append(f'  f{id(function)} [shape=box, style=rounded, label="{type(function).__name__}"];')
        lines.append(f"  f{id(function)} -> t{id(output)};")
        for parent in function.inputs:
            add_tensor(parent)
            lines.append(f"  t{id(parent)} -> f{id(function)};")
            stack.append(parent)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _values(weights):
    """Nested lists of the values of a Tensor or an array on any device (read back through backend.to_host), or lists as they are."""
    if isinstance(weights, Tensor):
        weights = weights.data
    return backend.to_host(weights).tolist() if backend.is_array(weights) else weights


def heatmap_text(weights, row_labels, column_labels):
    """A (rows, columns) weight matrix as block characters, darker for more weight."""
    rows = _values(weights)
    width = max(len(label) for label in row_labels)
    header = " " * (width + 1) + "".join(label[:2].rjust(2) for label in column_labels)
    lines = [header]
    for label, row in zip(row_labels, rows):
        top = max(row) or 1.0
        cells = "".join(SHADES[min(int(value / top * (len(SHADES) - 1) + 0.5), len(SHADES) - 1)] * 2 for value in row)
        lines.append(f"{label.rjust(width)} {cells}")
    return "\n".join(lines)


def attention_svg(maps, row_labels, column_labels, title="cross-attention"):
    """An SVG grid of attention maps, one panel per (layer, head); maps has shape (layers, heads, rows, columns)."""
    maps = _values(maps)
    cell, gap, margin = 16, 24, 40
    n_rows, n_columns = len(row_labels), len(column_labels)
    panel_width, panel_height = n_columns * cell, n_rows * cell
    layers, heads = len(maps), len(maps[0])
    width = max(margin + heads * (panel_width + gap + margin), 440)  # room for the title
    height = margin + 20 + layers * (panel_height + gap + margin)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica" font-size="10">',
             f'<text x="{margin}" y="20" font-size="14">{escape(title)}: rows are outputs, columns are inputs</text>']
    for layer in range(layers):
        for head in range(heads):
            left = margin + head * (panel_width + gap + margin)
            top = margin + 20 + layer * (panel_height + gap + margin)
            parts.append(f'<text x="{left}" y="{top - 6}">layer {layer + 1}, head {head + 1}</text>')
            for i, row in enumerate(maps[layer][head]):
                for j, value in enumerate(row):
                    parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                                 f'fill="#1f4e9c" fill-opacity="{value:.3f}" stroke="#ddd" stroke-width="0.5"/>')
            for i, label in enumerate(row_labels):
                parts.append(f'<text x="{left - 4}" y="{top + i * cell + 12}" text-anchor="end">{escape(label)}</text>')
            for j, label in enumerate(column_labels):
                parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top + panel_height + 12}" text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


LINE_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def line_chart_svg(panels, x_label, y_label, title="", shade=None, labelled_x=None):
    """Side-by-side line charts as SVG. `panels` maps a panel title to {series name: [(x, y), ...]};
    y runs from 0 to 1 (an accuracy), x over the union of the series' x values. shade: (x from,
    x to, label), a band drawn behind the lines of every panel; labelled_x: the x values that get
    a label under the axis (default every one)."""
    width, height, margin = 360, 260, 50
    total_width = margin + len(panels) * (width + margin)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height + 2 * margin + 30}" '
             f'font-family="Helvetica" font-size="11">']
    if title:
        parts.append(f'<text x="{margin}" y="20" font-size="14">{escape(title)}</text>')
    names = sorted({name for series in panels.values() for name in series})
    colours = {name: LINE_COLOURS[i % len(LINE_COLOURS)] for i, name in enumerate(names)}
    for index, (panel, series) in enumerate(panels.items()):
        left, top = margin + index * (width + margin), margin
        xs = [x for points in series.values() for x, _ in points]
        low, high = min(xs), max(xs)

        def place(x, y):
            return left + (x - low) / ((high - low) or 1) * width, top + (1.0 - y) * height

        if shade is not None:
            (start, _), (end, _) = place(shade[0], 0.0), place(shade[1], 0.0)
            parts.append(f'<rect x="{start:.1f}" y="{top}" width="{end - start:.1f}" height="{height}" fill="#eeeeee"/>')
            parts.append(f'<text x="{(start + end) / 2:.1f}" y="{top + 14}" text-anchor="middle" fill="#777">'
                         f'{escape(shade[2])}</text>')
        parts.append(f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{left + width / 2}" y="{top - 8}" text-anchor="middle" font-size="12">{escape(panel)}</text>')
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            _, y = place(low, tick)
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
        for x in sorted(set(xs)) if labelled_x is None else labelled_x:
            px, _ = place(x, 0.0)
            parts.append(f'<text x="{px:.1f}" y="{top + height + 14}" text-anchor="middle">{x:g}</text>')
        parts.append(f'<text x="{left + width / 2}" y="{top + height + 30}" text-anchor="middle">{escape(x_label)}</text>')
        parts.append(f'<text x="{left - 36}" y="{top + height / 2}" transform="rotate(-90 {left - 36} {top + height / 2})" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        for name, points in series.items():
            coordinates = " ".join(f"{px:.1f},{py:.1f}" for px, py in (place(x, y) for x, y in points))
            parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
    for i, name in enumerate(names):
        x, y = margin + i * 170, height + 2 * margin + 16
        parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{colours[name]}" stroke-width="3"/>')
        parts.append(f'<text x="{x + 30}" y="{y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
