"""`python -m tinyattn`, the README's main command, learns and rejects bad flags in one line."""
import re
import subprocess
import sys


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "tinyattn", *args], capture_output=True, text=True, timeout=120)


def test_demo_checks_gradients_draws_a_lookup_writes_a_graph_and_fits_the_curve(tmp_path):
    graph = tmp_path / "graph.dot"
    result = run_demo("--steps", "600", "--graph", str(graph))
    assert result.returncode == 0, result.stderr
    assert "gradcheck:" in result.stdout
    assert "each query fetches most from: attention, RNNs, autodiff" in result.stdout
    rows = result.stdout.split("darker is more weight):\n", 1)[1].splitlines()[1:4]
    assert [row.split("?")[0].strip() for row in rows] == ["q1: attention", "q2: RNNs", "q3: autodiff"]
    assert all("█" * 10 in row for row in rows)  # each query's heaviest key, drawn at full shade
    dot = graph.read_text()
    assert dot.startswith("digraph tinyattn {") and 'label="Softmax"' in dot and 'label="queries' in dot
    error = float(re.search(r"final mean squared error ([0-9.]+)", result.stdout).group(1))
    assert error < 0.02  # sin(3x) has variance ~0.45 on [-1, 1]; an untrained net sits far above this


def test_demo_rejects_bad_flags_with_exit_code_2():
    result = run_demo("--steps", "-5")
    assert result.returncode == 2
    assert "must be positive" in result.stderr
