"""The length-generalization experiment, end to end on tiny settings: its JSON, table and chart."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = "{http://www.w3.org/2000/svg}"


def test_quick_experiment_writes_results_table_and_chart(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "length_generalization.py"), "--quick",
                             "--seeds", "0,1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    settings = report["settings"]
    assert report["seeds"] == [0, 1] and report["models"] == ["transformer", "gpt"] and report["tasks"] == ["copy", "reverse"]
    runs = report["results"]
    encodings = {model: {run["encoding"] for run in runs if run["model"] == model} for model in report["models"]}
    assert encodings["gpt"] == set(report["encodings"])
    assert encodings["transformer"] == set(report["encodings"]) - {"none"}  # a bag of symbols: left out
    assert len(runs) == 2 * 2 * (len(encodings["gpt"]) + len(encodings["transformer"]))
    for run in runs:
        assert {"model", "task", "encoding", "positional", "randomized_positions", "seed", "parameters", "steps",
                "train_seconds", "by_length"} <= set(run)
        assert run["steps"] == settings["steps"]
        # every length is evaluated, past the training range up to eval_max_len
        assert sorted(int(n) for n in run["by_length"]) == list(range(1, settings["eval_max_len"] + 1))
        assert all(figures["sequences"] == settings["per_length"] for figures in run["by_length"].values())
        assert all(0.0 <= f["exact_match"] <= f["token_accuracy"] + 1e-9 <= 1.0 + 1e-9 for f in run["by_length"].values())
        assert (run["randomized_positions"] is not None) == run["encoding"].endswith("+randomized")
    for entry in report["summary"]:
        assert entry["seeds"] == [0, 1]
        figure = entry[f"exact_match 1-{settings['max_len']} (trained)"]
        assert figure["min"] <= figure["mean"] <= figure["max"]
    assert report["provenance"]["command"] == f"python experiments/length_generalization.py --quick --seeds 0,1 --out {tmp_path}"
    assert set(report["provenance"]) == {"command", "commit", "machine", "python", "numpy"}
    table = (tmp_path / "results.md").read_text()
    assert f"Command: `{report['provenance']['command']}`" in table and f"Commit: `{report['provenance']['commit']}`" in table
    assert "### gpt, reverse: exact-match / token accuracy by source length" in table
    assert f"| encoding | 1-{settings['max_len']} (trained) | {settings['max_len'] + 1}-{settings['eval_max_len']} |" in table
    svg = ElementTree.parse(tmp_path / "accuracy_by_length.svg").getroot()
    polylines = svg.findall(f"{SVG}polyline")
    assert len(polylines) == 2 * (len(encodings["gpt"]) + len(encodings["transformer"]))  # one per encoding in 4 panels
    assert all(len(p.get("points").split()) == settings["eval_max_len"] for p in polylines)
    shaded = [rect for rect in svg.findall(f"{SVG}rect") if rect.get("fill") == "#eeeeee"]
    assert len(shaded) == 4  # the training range, in each panel
