"""The bottleneck experiment, end to end on tiny settings: its JSON, table and chart."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from models import RNNSeq2Seq
from tinyattn.tasks import SequenceTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = SequenceTask("copy", max_len=6).vocab_size  # every quick task's: lookup's 2 pairs need no more than 10 symbols


def test_quick_experiment_writes_results_table_and_chart(tmp_path):
    arguments = ["--quick", "--tasks", "copy,reverse,lookup", "--out", str(tmp_path)]  # the defaults, and lookup
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bottleneck.py"), *arguments],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["tasks"] == ["copy", "reverse", "lookup"] and len(summary["results"]) == 9
    assert summary["command"] == "python experiments/bottleneck.py " + " ".join(arguments)
    assert summary["machine"]["git"]["commit"] and summary["machine"]["cpu_count"] == os.cpu_count()
    counts = {}
    for run in summary["results"]:
        assert {"model", "task", "parameters", "steps", "exact_match", "token_accuracy", "by_length"} <= set(run)
        if run["model"] != "transformer":  # the new encoder, both directions, in both RNNs
            model = RNNSeq2Seq(VOCAB, hidden_size=run["hidden_or_d_model"], attention=run["model"] == "rnn-attention")
            assert run["bidirectional"] is True and model.encoder_reverse is not None
            assert run["parameters"] == model.num_parameters()
        assert run["steps"] == summary["settings"]["steps"]
        lengths = range(3, 7, 2) if run["task"] == "lookup" else range(1, 7)  # a lookup source is 2 x pairs + 1 long
        assert sorted(int(n) for n in run["by_length"]) == list(lengths)
        assert 0.0 <= run["exact_match"] <= 1.0 and 0.0 <= run["token_accuracy"] <= 1.0
        counts.setdefault(run["task"], []).append(run["parameters"])
    for task_counts in counts.values():  # parameter counts matched within 15%
        assert max(task_counts) / min(task_counts) < 1.15
    table = (tmp_path / "results.md").read_text()
    assert "### copy: exact-match by source length" in table and "| 1-2 |" in table
    lookup = table.split("### lookup: exact-match by pairs")[1]
    assert [line.split("|")[1].strip() for line in lookup.splitlines()[4:6]] == ["1", "2"]  # by pairs, one at a time
    svg = ElementTree.parse(tmp_path / "accuracy_by_length.svg").getroot()
    polylines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 9  # three models on each of three panels
    points = [len(p.get("points").split()) for p in polylines]
    assert points == [3] * 6 + [2] * 3  # lengths 1..6 in buckets of 2; lookup's pairs 1..2 one at a time
    assert "pairs" in [text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")]  # lookup's x axis
