"""The bottleneck experiment, end to end on tiny settings: its JSON, table and chart."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from models import RNNSeq2Seq
from tinyattn.tasks import SequenceTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = SequenceTask("copy", max_len=6).vocab_size  # the quick mode's tasks


def test_quick_experiment_writes_results_table_and_chart(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bottleneck.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["tasks"] == ["copy", "reverse"] and len(summary["results"]) == 6
    assert summary["command"] == f"python experiments/bottleneck.py --quick --out {tmp_path}"
    assert summary["machine"]["git"]["commit"] and summary["machine"]["cpu_count"] == os.cpu_count()
    counts = {}
    for run in summary["results"]:
        assert {"model", "task", "parameters", "steps", "exact_match", "token_accuracy", "by_length"} <= set(run)
        if run["model"] != "transformer":  # the new encoder, both directions, in both RNNs
            model = RNNSeq2Seq(VOCAB, hidden_size=run["hidden_or_d_model"], attention=run["model"] == "rnn-attention")
            assert run["bidirectional"] is True and model.encoder_reverse is not None
            assert run["parameters"] == model.num_parameters()
        assert run["steps"] == summary["settings"]["steps"]
        assert sorted(int(n) for n in run["by_length"]) == list(range(1, summary["settings"]["max_len"] + 1))
        assert 0.0 <= run["exact_match"] <= 1.0 and 0.0 <= run["token_accuracy"] <= 1.0
        counts.setdefault(run["task"], []).append(run["parameters"])
    for task_counts in counts.values():  # parameter counts matched within 15%
        assert max(task_counts) / min(task_counts) < 1.15
    table = (tmp_path / "results.md").read_text()
    assert "### copy: exact-match by source length" in table and "| 1-2 |" in table
    svg = ElementTree.parse(tmp_path / "accuracy_by_length.svg").getroot()
    polylines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 6  # three models on each of two panels
    assert all(len(p.get("points").split()) == 3 for p in polylines)  # lengths 1..6 in buckets of 2
