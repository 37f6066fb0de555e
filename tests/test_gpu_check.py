"""benchmarks/gpu_check.py: the whole script at --tiny sizes on "cuda" (the CuPy stand-in where
there is no GPU), and its readings of what pytest and train.py print."""
import contextlib
import importlib
import io
import json
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAINING = ["--task", "copy", "--vocab", "4", "--max-len", "4", "--d-model", "16", "--heads", "2", "--layers", "1",
                 "--d-ff", "32", "--batch-size", "16", "--eval-size", "32", "--warmup", "5", "--steps", "20",
                 "--eval-every", "10", "--device", "cpu"]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import each other as scripts
    return importlib.import_module("gpu_check")


@pytest.mark.parametrize("device", ["cuda"], indirect=True)
def test_the_whole_check_runs_at_tiny_sizes(device, gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--skip-suite", "--skip-train", "--skip-torch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PyTorch side skipped (--skip-torch)" in printed
    record = json.loads(out.read_text())
    gpu, figures = record["machine"]["gpu"], record["figures"]
    assert gpu["name"] and gpu["cupy"] and gpu["cuda_runtime"] and gpu["driver_cuda"]
    assert record["machine"]["numpy"] and figures["suite"] is None and figures["train"] is None
    parity = figures["parity"]
    assert parity["ok"] and parity["steps"] == 3 and len(parity["step_losses_device"]) == 3
    assert parity["gradients_compared"] > 10
    sides = figures["benchmark"]["sides"]
    assert set(sides) == {"tinyattn cuda", "tinyattn cpu"}
    assert all(side["median_step_ms"] > 0 and side["achieved_tflops"] > 0 for side in sides.values())
    assert sides["tinyattn cuda"]["achieved_over_matmul"] > 0 and sides["tinyattn cpu"]["achieved_over_matmul"] is None
    table = printed[printed.index("check "):]  # the table comes last
    assert "parity: worst of" in table and "step: tinyattn cuda" in table and "cpu step / cuda step" in table


def test_pytest_counts_reads_the_summary_line(gpu_check):
    assert gpu_check.pytest_counts("..F\n=== short test summary info ===\nFAILED tests/x.py::t[cuda]\n"
                                   "1 failed, 2 passed, 3 skipped, 400 deselected, 1 error in 5.2s\n") == {
        "failed": 1, "passed": 2, "skipped": 3, "deselected": 400, "errors": 1}
    assert gpu_check.pytest_counts("") == {}


def test_train_result_reads_what_train_py_prints(gpu_check, tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert train.main([*TINY_TRAINING, "--out", str(tmp_path)]) == 0
    result = gpu_check.train_result(stdout.getvalue())
    assert result is not None and result["steps"] <= 20 and 0 <= result["exact_match"] <= 1
    assert isinstance(result["reached_target"], bool) and result["train_wall_s"] >= 0
