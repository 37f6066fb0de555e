"""Pictures: DOT graphs that parse as digraphs, heatmaps, well-formed SVG."""
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import nn
from tinyattn.viz import attention_svg, filmstrip_svg, heatmap_text, to_dot

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

NODE = re.compile(r'^\s*(t|f)\d+ \[[^\]]*label="[^"]*"[^\]]*\];$')
EDGE = re.compile(r"^\s*([tf]\d+) -> ([tf]\d+);$")

SVG = "{http://www.w3.org/2000/svg}"


def parse_digraph(text):
    """A minimal DOT reader for what to_dot writes: returns (nodes, edges) or raises AssertionError."""
    lines = text.strip().splitlines()
    assert lines[0] == "digraph tinyattn {" and lines[-1] == "}"
    nodes, edges = set(), []
    for line in lines[1:-1]:
        if NODE.match(line):
            nodes.add(line.split()[0])
        elif EDGE.match(line):
            edges.append(EDGE.match(line).groups())
        else:
            assert re.match(r"^\s*(rankdir=|node \[)", line), f"not a DOT statement: {line!r}"
    assert all(a in nodes and b in nodes for a, b in edges)
    return nodes, edges


def test_to_dot_draws_ops_tensors_and_parameter_names():
    layer = nn.Linear(3, 2, generator=ta.Generator(0))
    x = ta.tensor([[1.0, 2.0, 3.0]])
    loss = (layer(x).tanh() * 2.0).sum()
    text = to_dot(loss, names={p: n for n, p in layer.named_parameters()})
    nodes, edges = parse_digraph(text)
    assert sum(n.startswith("f") for n in nodes) == 4  # Linear, Tanh, Mul, Sum
    for op in ("Linear", "Tanh", "Mul", "Sum"):
        assert f'label="{op}"' in text
    assert 'label="weight\\n2x3"' in text and "fillcolor" in text
    assert len(edges) == 4 + 7  # each op to its output; inputs: Linear 3, Tanh 1, Mul 2 (the 2.0 too), Sum 1


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_graphviz_accepts_the_dot_text():
    x = ta.tensor([1.0, 2.0], requires_grad=True)
    result = subprocess.run(["dot", "-Tsvg"], input=to_dot((x * x).sum()), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_to_dot_after_backward_says_to_retain_the_graph():
    x = ta.tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        to_dot(y)


def test_heatmap_shades_follow_the_weights():
    weights = np.array([[0.0, 1.0], [0.5, 0.5]])
    text = heatmap_text(weights, ["a", "b"], ["x", "y"])
    lines = text.splitlines()
    assert lines[1] == "a   ██" and lines[2] == "b ████"
    on_device = ta.tensor(weights, device=ta.get_default_device())
    assert heatmap_text(on_device, ["a", "b"], ["x", "y"]) == text == heatmap_text(on_device.data, ["a", "b"], ["x", "y"])


def test_heatmap_cells_are_as_wide_as_two_digit_labels():
    text = heatmap_text(np.array([[0.0, 1.0, 0.0]]), ["7"], ["3", "12", "0"])
    assert text.splitlines() == ["    3 12  0", "7    ███   "]  # the column of "12" is the shaded one


def test_attention_svg_is_well_formed_with_one_rect_per_cell():
    maps = np.random.default_rng(0).random((2, 3, 4, 5))
    svg = attention_svg(ta.tensor(maps, device=ta.get_default_device()), ["a", "b", "<eos>", "d"], list("vwxyz"))
    assert svg == attention_svg(maps, ["a", "b", "<eos>", "d"], list("vwxyz"))  # a tensor on the device draws as its values
    root = ElementTree.fromstring(svg)
    panels = root.findall(f"{SVG}g[@class='map']")
    assert len(panels) == 2 * 3 and all(len(panel.findall(f"{SVG}rect")) == 4 * 5 for panel in panels)
    assert "&lt;eos&gt;" in svg
    assert float(panels[0].find(f"{SVG}rect").get("fill-opacity")) == pytest.approx(maps[0, 0, 0, 0], abs=1e-3)
    assert_legible_on_a_dark_page(root)


def assert_legible_on_a_dark_page(root):
    """The picture paints its own white background first, its ink is dark, and an attention
    picture has a colour scale from 0 to 1."""
    background = root.find(f"{SVG}rect")
    assert (background.get("width"), background.get("height"), background.get("fill")) == ("100%", "100%", "#ffffff")
    assert root.get("fill") == "#222222"
    scale = root.find(f"{SVG}g[@class='colour-scale']")
    if scale is not None:
        assert [text.text for text in scale.findall(f"{SVG}text")] == ["weight", "1", "0.5", "0"]


def test_a_filmstrip_has_one_column_per_frame_and_a_panel_per_layer():
    frames = [{"caption": f"step {step}, exact-match {accuracy:.0%}", "rows": rows,
               "maps": np.random.default_rng(step).random((2, len(rows), 3)).tolist()}
              for step, accuracy, rows in ((100, 0.1, ["a", "b"]), (200, 0.5, ["a", "b", "c", "<eos>"]))]
    svg = filmstrip_svg(frames, ["x", "y", "z"], "cross-attention of one held-out sequence")
    root = ElementTree.fromstring(svg)
    panels = root.findall(f"{SVG}g[@class='map']")
    assert [len(panel.findall(f"{SVG}rect")) for panel in panels] == [2 * 3, 2 * 3, 4 * 3, 4 * 3]
    texts = [text.text for text in root.iter(f"{SVG}text")]
    assert "step 100, exact-match 10%" in texts and "step 200, exact-match 50%" in texts and "&lt;eos&gt;" in svg
    lefts = [float(panel.find(f"{SVG}rect").get("x")) for panel in panels]
    assert lefts[0] == lefts[1] < lefts[2] == lefts[3]  # frames side by side, layers stacked
    assert_legible_on_a_dark_page(root)
