"""Pictures for study: the computation graph as Graphviz DOT, attention maps as text and SVG,
attention forming during training as an SVG filmstrip, accuracy charts.

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
    """A (rows, columns) weight matrix as block characters, darker for more weight; each cell
    as wide as the widest column label and a space (two characters for one-character labels)."""
    rows = _values(weights)
    width = max(len(label) for label in row_labels)
    cell = 2 if all(len(label) < 2 for label in column_labels) else max(len(label) for label in column_labels) + 1
    header = " " * (width + 1) + "".join(label.rjust(cell) for label in column_labels)
    lines = [header]
    for label, row in zip(row_labels, rows):
        top = max(row) or 1.0
        cells = "".join(SHADES[min(int(value / top * (len(SHADES) - 1) + 0.5), len(SHADES) - 1)] * cell for value in row)
        lines.append(f"{label.rjust(width)} {cells}")
    return "\n".join(lines)


# Every SVG gets a white background and dark ink: shown on a dark page (GitHub's dark mode
# puts images on #0d1117) a transparent picture would lose its black text.
BACKGROUND, INK, GRID, HEAT = "#ffffff", "#222222", "#dddddd", "#1f4e9c"
CELL, LABEL_SPACE = 16, 44  # an attention cell's side; room for row labels left of a panel and column labels under it


def _text_width(text, font_size=10):
    """About how wide Helvetica sets `text`: room to leave so labels do not run into the next panel."""
    return 0.6 * font_size * len(text)


def _svg_open(width, height, font_size):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'font-family="Helvetica" font-size="{font_size}" fill="{INK}">',
            f'<rect width="100%" height="100%" fill="{BACKGROUND}"/>']


def _attention_panel(parts, left, top, weights, row_labels, column_labels, caption):
    """One map at (left, top): a cell per weight, its opacity the weight, labels left and below, caption above."""
    parts.append(f'<text x="{left}" y="{top - 6}">{escape(caption)}</text>')
    parts.append('<g class="map">')
    for i, row in enumerate(weights):
        for j, value in enumerate(row):
            parts.append(f'<rect x="{left + j * CELL}" y="{top + i * CELL}" width="{CELL}" height="{CELL}" '
                         f'fill="{HEAT}" fill-opacity="{value:.3f}" stroke="{GRID}" stroke-width="0.5"/>')
    parts.append("</g>")
    for i, label in enumerate(row_labels):
        parts.append(f'<text x="{left - 4}" y="{top + i * CELL + 12}" text-anchor="end">{escape(label)}</text>')
    for j, label in enumerate(column_labels):
        parts.append(f'<text x="{left + j * CELL + CELL / 2}" y="{top + len(weights) * CELL + 12}" '
                     f'text-anchor="middle">{escape(label)}</text>')


def _colour_scale(parts, left, top, height=96):
    """A key to the cells' shading: weight 0 (white) at the bottom to 1 (full colour) at the top.
    Drawn as stacked cells, as the maps are, not as a gradient some viewers render differently."""
    steps = 8
    parts.append(f'<g class="colour-scale"><text x="{left}" y="{top - 6}">weight</text>')
    for k in range(steps):
        value = 1 - k / (steps - 1)
        parts.append(f'<rect x="{left}" y="{top + k * height / steps:.1f}" width="12" height="{height / steps:.1f}" '
                     f'fill="{HEAT}" fill-opacity="{value:.3f}" stroke="{GRID}" stroke-width="0.5"/>')
    for value, y in ((1.0, top + 8), (0.5, top + height / 2 + 4), (0.0, top + height)):
        parts.append(f'<text x="{left + 16}" y="{y:.1f}">{value:g}</text>')
    parts.append("</g>")


def attention_svg(maps, row_labels, column_labels, title="cross-attention"):
    """An SVG grid of attention maps, one panel per (layer, head), with a colour scale; maps
    has shape (layers, heads, rows, columns)."""
    maps = _values(maps)
    gap = 24
    layers, heads = len(maps), len(maps[0])
    panel_width = max(len(column_labels) * CELL, _text_width(f"layer {layers}, head {heads}"))
    panel_height = len(row_labels) * CELL
    scale_left = LABEL_SPACE + heads * (panel_width + gap + LABEL_SPACE)
    width = max(scale_left + 40, 440)  # room for the colour scale and the title
    height = max(LABEL_SPACE + 20 + layers * (panel_height + gap + LABEL_SPACE), 180)
    parts = _svg_open(width, height, 10)
    parts.append(f'<text x="{LABEL_SPACE}" y="20" font-size="14">{escape(title)}: rows are outputs, columns are inputs</text>')
    for layer in range(layers):
        for head in range(heads):
            left = LABEL_SPACE + head * (panel_width + gap + LABEL_SPACE)
            top = LABEL_SPACE + 20 + layer * (panel_height + gap + LABEL_SPACE)
            _attention_panel(parts, left, top, maps[layer][head], row_labels, column_labels, f"layer {layer + 1}, head {head + 1}")
    _colour_scale(parts, scale_left, LABEL_SPACE + 20)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def filmstrip_svg(frames, column_labels, title):
    """Attention maps as they form during training: one column per frame, one row per layer.
    Each frame is a dict with 'caption' (such as "step 300, exact-match 48%"), 'rows' (its
    row labels: the tokens decoded then) and 'maps' (layers, rows, columns), a head average."""
    gap, first_top = 16, LABEL_SPACE + 52
    panel_width = max([len(column_labels) * CELL] + [_text_width(frame["caption"], 11) for frame in frames])
    tallest = max(len(frame["rows"]) for frame in frames) * CELL
    layers = max(len(frame["maps"]) for frame in frames)
    column_width = panel_width + gap + LABEL_SPACE
    scale_left = LABEL_SPACE + len(frames) * column_width
    width = max(scale_left + 40, 440)
    height = max(first_top + layers * (tallest + gap + LABEL_SPACE), 220)
    parts = _svg_open(width, height, 10)
    parts.append(f'<text x="{LABEL_SPACE}" y="20" font-size="14">{escape(title)}</text>')
    parts.append(f'<text x="{LABEL_SPACE}" y="36">rows are outputs, columns are inputs; each layer\'s heads averaged</text>')
    for index, frame in enumerate(frames):
        left = LABEL_SPACE + index * column_width
        parts.append(f'<text x="{left}" y="{first_top - 22}" font-size="11" font-weight="bold">{escape(frame["caption"])}</text>')
        for layer, weights in enumerate(frame["maps"]):
            top = first_top + layer * (tallest + gap + LABEL_SPACE)
            _attention_panel(parts, left, top, weights, frame["rows"], column_labels, f"layer {layer + 1}")
    _colour_scale(parts, scale_left, first_top)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


LINE_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
LEGEND_ENTRY = 170  # the width of one series' entry in a chart's legend
Y_TOP = 1.08  # the top of a chart's y range: a line at 1.0 sits below the frame, not on it
# One marker shape per series, so series that coincide (all at 100%) are still told apart.
MARKERS = (lambda x, y, c: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{c}"/>',
           lambda x, y, c: f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="none" stroke="{c}" stroke-width="1.5"/>',
           lambda x, y, c: f'<path d="M {x:.1f} {y - 4:.1f} L {x + 4:.1f} {y + 3:.1f} L {x - 4:.1f} {y + 3:.1f} Z" fill="{c}"/>',
           lambda x, y, c: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="none" stroke="{c}" stroke-width="1.5"/>')


def line_chart_svg(panels, x_label, y_label, title="", shade=None, labelled_x=None, x_ticks=None):
    """Side-by-side line charts as SVG. `panels` maps a panel title to {series name: [(x, y), ...]};
    y runs from 0 to 1 (an accuracy), drawn with room above 1 so that a line at 100% stays
    visible, x over the union of the series' x values. x_label names every panel's x axis,
    or is a dict naming each panel's. shade: (x from, x to, label), a band drawn behind the
    lines of every panel; labelled_x: the x values that get a label under the axis (default
    every one); x_ticks: a label for an x value where it is not the number (a bucket of
    lengths as "1-4"). Points are marked, so lines that lie on one another still show each
    series."""
    width, height, margin = 360, 260, 50
    x_ticks = x_ticks or {}
    spacing = width + margin + 24  # a panel and the room for the next one's y-axis labels
    total_width = margin + len(panels) * spacing
    names = sorted({name for series in panels.values() for name in series})
    per_row = max(1, (total_width - margin) // LEGEND_ENTRY)
    legend_rows = -(-len(names) // per_row)
    parts = _svg_open(total_width, height + 2 * margin + 14 + 16 * legend_rows, 11)
    if title:
        parts.append(f'<text x="{margin}" y="20" font-size="14">{escape(title)}</text>')
    colours = {name: LINE_COLOURS[i % len(LINE_COLOURS)] for i, name in enumerate(names)}
    for index, (panel, series) in enumerate(panels.items()):
        left, top = margin + index * spacing, margin
        xs = [x for points in series.values() for x, _ in points]
        low, high = min(xs), max(xs)

        def place(x, y):
            return left + (x - low) / ((high - low) or 1) * width, top + (Y_TOP - y) / Y_TOP * height

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
            parts.append(f'<text x="{px:.1f}" y="{top + height + 14}" text-anchor="middle">{escape(x_ticks.get(x, f"{x:g}"))}</text>')
        axis = x_label[panel] if isinstance(x_label, dict) else x_label
        parts.append(f'<text x="{left + width / 2}" y="{top + height + 30}" text-anchor="middle">{escape(axis)}</text>')
        parts.append(f'<text x="{left - 36}" y="{top + height / 2}" transform="rotate(-90 {left - 36} {top + height / 2})" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        for name, points in series.items():
            coordinates = " ".join(f"{px:.1f},{py:.1f}" for px, py in (place(x, y) for x, y in points))
            parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
            marker = MARKERS[names.index(name) % len(MARKERS)]
            parts += [marker(px, py, colours[name]) for px, py in (place(x, y) for x, y in points)]
    for i, name in enumerate(names):  # the legend, in rows that fit the width
        x, y = margin + i % per_row * LEGEND_ENTRY, height + 2 * margin + 16 + 16 * (i // per_row)
        parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{colours[name]}" stroke-width="3"/>')
        parts.append(MARKERS[i % len(MARKERS)](x + 12, y - 4, colours[name]))
        parts.append(f'<text x="{x + 30}" y="{y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
