"""train.py end to end: it learns, resumes bit for bit, survives Ctrl-C, and refuses bad input in one line.

Every run uses a tiny copy task (vocab 4, lengths 1..4, one layer of width 32), which a
CPU learns to 100% held-out exact-match in about 200 steps, a second or two.
"""
import contextlib
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import train
from models import Config, ConfigError, training
from tinyattn import parallel
from models.evaluation import SAMPLES_SHOWN
from models.training import CHECKPOINT_NAME, Run, ShardedBackward, forward_backward, shards_for, token_accuracy
from tinyattn import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--task", "copy", "--vocab", "4", "--min-len", "1", "--max-len", "4", "--d-model", "32", "--heads", "2",
        "--layers", "1", "--d-ff", "64", "--batch-size", "32", "--eval-size", "64", "--warmup", "20"]
LOG_KEYS = {"step", "loss", "exact_match", "token_accuracy", "lr", "elapsed"}
HELD_OUT = re.compile(r"held-out \((\d+) sequences\): exact-match ([0-9.]+)%")
EVALUATED = re.compile(r"held-out exact-match ([0-9.]+)%.* on (\d+) sequences")


def run_main(argv):
    """train.main in-process: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def error_line(err):
    """The one line a failure prints (tqdm may leave a cleared bar before it, which is not a line of text)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line of error, got {err!r}"
    return lines[0]


BAR = re.compile(r"\s*(\d+%)?\|.*\| \d+/\S+ \[")  # a bar tqdm leaves where training stopped ("|  | 30/? [" with no total)


def error_after_bar(err):
    """The one line a failure during training prints, below the progress bar it leaves."""
    assert "Traceback" not in err
    return error_line("\n".join(line for line in err.replace("\r", "\n").splitlines() if not BAR.match(line)))


def snapshot(folder):
    """Every file in a folder (hidden ones included) with its bytes."""
    folder = Path(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small copy model trained to the target, shared by the evaluate, decode and fault tests."""
    base = tmp_path_factory.mktemp("trained")
    out, log = base / "run", base / "log.jsonl"
    code, stdout, stderr = run_main([*TINY, "--lr", "1e-2", "--steps", "800", "--eval-every", "50",
                                     "--target-accuracy", "1.0", "--out", out, "--log", log])
    assert code == 0, stderr
    path = out / CHECKPOINT_NAME
    return {"path": path, "out": out, "log": log, "stdout": stdout, "stderr": stderr, "bytes": path.read_bytes()}


# --- 1. it learns --------------------------------------------------------------------------------

def test_learns_copy_to_full_held_out_exact_match(trained):
    stdout = trained["stdout"]
    sequences, exact = HELD_OUT.search(stdout).groups()
    assert int(sequences) == 64
    assert float(exact) == 100.0
    assert "\nreached the target 100% (--target-accuracy)\n" in stdout
    summary = re.search(r"^steps (\d+), wall time ([0-9.]+) s, checkpoint (.+)$", stdout, re.M)
    assert summary, stdout
    steps = int(summary.group(1))
    assert 0 < steps < 800 and steps % 50 == 0  # stopped early, at an evaluation, once the target was reached
    assert float(summary.group(2)) > 0
    assert summary.group(3) == str(trained["path"])
    assert trained["path"].is_file()
    samples = stdout.split("samples (input -> output):\n", 1)[1].splitlines()
    assert len(samples) == SAMPLES_SHOWN
    for line in samples:
        match = re.fullmatch(r"  ([0-3](?: [0-3])*) -> ([0-3](?: [0-3])*)  ✓", line)
        assert match, line
        assert match.group(1) == match.group(2)  # copy: the output is the input
    # the early stop happened at the first evaluation that reached 100%, and the checkpoint is from that step
    log = read_log(trained["log"])
    assert log[-1]["step"] == steps and log[-1]["exact_match"] == 1.0
    assert all(entry["exact_match"] < 1.0 for entry in log[:-1])
    assert checkpoint.load(trained["path"])["step"] == steps


# --- 3. checkpoint round trip --------------------------------------------------------------------

def test_evaluate_reports_what_training_ended_with(trained):
    code, stdout, stderr = run_main(["--checkpoint", trained["path"], "--evaluate"])
    assert code == 0, stderr
    exact, sequences = EVALUATED.search(stdout).groups()
    trained_sequences, trained_exact = HELD_OUT.search(trained["stdout"]).groups()
    assert (exact, sequences) == (trained_exact, trained_sequences) == ("100.0", "64")
    step = checkpoint.load(trained["path"])["step"]
    assert f"(step {step})" in stdout
    assert stdout.count("✓") == SAMPLES_SHOWN
    assert trained["path"].read_bytes() == trained["bytes"]  # inspecting never writes


def test_saved_checkpoint_holds_the_whole_training_state(trained):
    state = checkpoint.load(trained["path"])
    assert state["config"]["d_model"] == 32 and state["config"]["task"] == "copy"
    run = Run(Config.from_dict(dict(state["config"], device=None)))
    assert set(state["model"]) == set(run.model.state_dict())
    for name, value in run.model.state_dict().items():
        assert state["model"][name].shape == tuple(value.shape)
        assert np.isfinite(state["model"][name]).all()
    run.restore(state, trained["path"])
    assert run.step == state["step"]
    assert run.schedule.state_dict()["step"] == state["step"] + 1  # the schedule holds the lr of the next step
    assert run.optimizer.state_dict()["step"] == state["step"]


# --- 2. resume equals an uninterrupted run ---------------------------------------------------------

def log_without_elapsed(path):
    return [{key: value for key, value in entry.items() if key != "elapsed"} for entry in read_log(path)]


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    assert set(a["model"]) == set(b["model"])
    for name in a["model"]:
        assert np.array_equal(a["model"][name], b["model"][name]), name
    for index, slots in a["optimizer"]["state"].items():
        for slot, value in slots.items():
            other = b["optimizer"]["state"][index][slot]
            assert np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other, (index, slot)
    assert a["optimizer"]["step"] == b["optimizer"]["step"] and a["optimizer"]["lr"] == b["optimizer"]["lr"]
    assert a["schedule"] == b["schedule"]
    assert a["data"] == b["data"]
    assert a["dropout_generator"] == b["dropout_generator"]


@pytest.mark.parametrize("extra", [["--threads", "1"], ["--threads", "2"], ["--dropout", "0.1", "--threads", "1"],
                                   ["--dropout", "0.1", "--threads", "2"], ["--model", "gpt", "--threads", "2"],
                                   ["--randomized-positions", "12", "--threads", "2"],
                                   ["--model", "gpt", "--positional", "rope", "--randomized-positions", "20", "--threads", "1"]],
                         ids=["transformer", "two-threads", "dropout", "dropout-two-threads", "gpt", "randomized-two-threads",
                              "gpt-rope-randomized"])
def test_resume_equals_an_uninterrupted_run(tmp_path, extra):
    flags = [*TINY, "--lr", "3e-3", "--steps", "40", "--eval-every", "10", "--target-accuracy", "1.0", *extra]
    code, stdout, stderr = run_main([*flags, "--out", tmp_path / "a", "--log", tmp_path / "a.jsonl"])
    assert code == 0, stderr
    a_log = log_without_elapsed(tmp_path / "a.jsonl")
    assert [entry["step"] for entry in a_log] == [10, 20, 30, 40]  # no early stop: all four evaluations happened
    assert "steps 40," in stdout

    code, stdout, stderr = run_main([*flags, "--stop-at", "20", "--out", tmp_path / "b", "--log", tmp_path / "b.jsonl"])
    assert code == 0, stderr
    assert "stopped at step 20" in stdout and "--resume" in stdout
    assert checkpoint.load(tmp_path / "b" / CHECKPOINT_NAME)["step"] == 20
    code, stdout, stderr = run_main(["--resume", tmp_path / "b" / CHECKPOINT_NAME, "--log", tmp_path / "b.jsonl"])
    assert code == 0, stderr
    assert "steps 40," in stdout
    b_log = log_without_elapsed(tmp_path / "b.jsonl")
    assert [entry["step"] for entry in b_log] == [10, 20, 30, 40]  # the resumed run appended to the log
    assert b_log == a_log  # every logged number, steps 30 and 40 included, bit for bit
    assert {key for key in read_log(tmp_path / "b.jsonl")[-1]} == LOG_KEYS

    final_a = checkpoint.load(tmp_path / "a" / CHECKPOINT_NAME)
    final_b = checkpoint.load(tmp_path / "b" / CHECKPOINT_NAME)
    assert final_a["step"] == 40
    assert_same_state(final_a, final_b)
    assert final_a["config"] == dict(final_b["config"], out=final_a["config"]["out"], log=final_a["config"]["log"])


def test_two_threads_and_two_processes_train_as_one_does_up_to_rounding(tmp_path):
    flags = [*TINY, "--steps", "30", "--eval-every", "10", "--target-accuracy", "1.0"]
    logs = {}
    for name, extra, said in (("one", ["--threads", "1"], "1 thread per step"),
                              ("threads", ["--threads", "2", "--parallel", "threads"], "2 threads per step"),
                              ("processes", ["--threads", "2", "--parallel", "processes"], "2 processes per step")):
        code, stdout, stderr = run_main([*flags, *extra, "--out", tmp_path / name, "--log", tmp_path / f"{name}.jsonl"])
        assert code == 0, stderr
        assert said in stdout
        logs[name] = log_without_elapsed(tmp_path / f"{name}.jsonl")
    for one, two in zip(logs["one"], logs["threads"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
    assert logs["processes"] == logs["threads"]  # the same shards, summed in the same order: the same bits


@pytest.mark.parametrize("settings, threads", [
    ({}, 2), ({"batch_size": 16}, 2), ({"batch_size": 8}, 1), ({"model": "gpt", "batch_size": 16}, 2),
    ({"model": "gpt", "batch_size": 8}, 1), ({"model": "rnn-attention", "batch_size": 16}, 2), ({"model": "rnn"}, 2),
    ({"model": "rnn", "batch_size": 32}, 1), ({"d_model": 32, "batch_size": 16}, 1), ({"threads": 1}, 1),
    ({"parallel": "threads"}, 1), ({"parallel": "threads", "batch_size": 128}, 2), ({"parallel": "threads", "model": "gpt"}, 2),
    ({"parallel": "threads", "model": "gpt", "batch_size": 32}, 1), ({"parallel": "threads", "d_model": 256, "layers": 4, "d_ff": 1024}, 2),
    ({"parallel": "threads", "d_model": 128}, 2), ({"parallel": "threads", "d_model": 32, "batch_size": 128}, 1),
    ({"parallel": "threads", "model": "rnn-attention"}, 1), ({"parallel": "threads", "model": "rnn", "batch_size": 256}, 2),
    ({"parallel": "threads", "dropout": 0.1, "batch_size": 128}, 2), ({"threads": 3, "batch_size": 16}, 3)])
def test_default_threads_go_where_they_pay(monkeypatch, settings, threads):
    monkeypatch.setattr(training, "default_shards", lambda device: 2)  # a 2-core CPU whose BLAS threads can be set
    monkeypatch.setattr(training, "default_parallel", lambda device: "processes")  # as on Linux
    assert shards_for(Config(**settings)) == threads


def test_processes_are_refused_off_the_cpu(monkeypatch):
    with pytest.raises(ConfigError, match="^--parallel processes run CPU shards; with --device cuda the batch's parts run on threads$"):
        Config(parallel="processes", device="cuda").check()
    monkeypatch.setattr(training.ta, "get_default_device", lambda: "cuda")  # TINYATTN_DEVICE=cuda, which Config does not see
    with pytest.raises(ConfigError, match="on the cuda device the batch's parts run on threads"):
        training.parallel_for(Config(parallel="processes"))


def test_parallel_defaults_to_processes_on_a_linux_cpu_and_threads_elsewhere(monkeypatch):
    monkeypatch.setattr(training, "default_shards", lambda device: 2)
    monkeypatch.setattr(parallel.sys, "platform", "linux")
    assert training.parallel_for(Config()) == "processes" and training.parallel_for(Config(parallel="threads")) == "threads"
    assert training.parallel_for(Config(device="cuda")) == "threads"
    monkeypatch.setattr(parallel.sys, "platform", "darwin")  # fork is unsafe beside macOS's system libraries
    assert training.parallel_for(Config()) == "threads" and shards_for(Config()) == 1


@pytest.mark.parametrize("kind, cores, settings, shards, blas_threads", [
    ("threads", 2, {"batch_size": 128}, 2, 1), ("threads", 2, {"model": "rnn-attention"}, 1, 1), ("threads", 2, {"threads": 1}, 1, 1),
    ("threads", 2, {}, 1, 1), ("threads", 8, {"model": "gpt"}, 2, 4), ("threads", 8, {"threads": 3, "batch_size": 16}, 3, 1),
    ("threads", 8, {"model": "rnn"}, 1, 1), ("threads", 8, {"threads": 1}, 1, 1),
    ("processes", 2, {}, 2, 1), ("processes", 2, {"model": "rnn-attention"}, 2, 1), ("processes", 2, {"batch_size": 8}, 1, 1),
    ("processes", 8, {"model": "rnn"}, 2, 4), ("processes", 8, {"threads": 3, "batch_size": 16}, 3, 1),
    ("processes", 8, {"threads": 1}, 1, 1)])
def test_each_step_thread_runs_blas_on_its_share_of_the_cores(monkeypatch, kind, cores, settings, shards, blas_threads):
    monkeypatch.setattr(training, "default_shards", lambda device: 2)
    monkeypatch.setattr(training.cpu, "core_count", lambda: cores)
    sharded = training.sharded_backward_for(Config(**settings, parallel=kind))
    assert (sharded.shards, sharded.blas_threads_per_shard, sharded.parallel) == (shards, blas_threads, kind)
    said = {("threads", 2, 1): "2 threads per step", ("threads", 1, 1): "1 thread per step",
            ("threads", 3, 1): "3 threads per step", ("threads", 2, 4): "8 threads per step (2 shards of 4 BLAS threads)",
            ("processes", 2, 1): "2 processes per step", ("processes", 1, 1): "1 thread per step",
            ("processes", 3, 1): "3 processes per step", ("processes", 2, 4): "2 processes per step, 4 BLAS threads each"}
    assert training.threads_per_step(sharded) == said[kind, shards, blas_threads]


@pytest.mark.skipif(not training.cpu.can_limit_blas_threads(), reason="NumPy's BLAS thread count cannot be set here")
def test_a_run_on_one_thread_holds_blas_to_one_thread_in_steps_and_evaluation(monkeypatch):
    run = Run(Config(task="copy", vocab=4, max_len=4, model="rnn-attention", d_model=16, batch_size=8, eval_size=8))
    seen = []  # BLAS's thread count as the model forwards a batch, then as it decodes the held-out set

    def recording(method):
        def recorded(*args, **kwargs):
            seen.append(training.cpu.blas_thread_count())
            return method(*args, **kwargs)
        return recorded
    for name in ("forward_batch", "greedy_decode"):
        monkeypatch.setattr(run.model, name, recording(getattr(run.model, name)))
    with training.cpu.blas_threads(2):
        run.train_step()
        run.evaluate(run.eval_set())
    assert run.sharded.threads == 1 and seen == [1, 1]


def test_forward_backward_on_two_shards_gives_the_whole_batch_loss_and_gradients():
    config = Config(task="copy", vocab=4, max_len=4, d_model=32, heads=2, layers=1, d_ff=64, batch_size=32)
    runs = [Run(config) for _ in range(2)]
    batch = next(runs[0].stream)
    results = []
    for run, shards in zip(runs, (1, 2)):
        results.append(forward_backward(run.model, run.params, batch, ShardedBackward(shards)))
    (loss_one, predictions_one), (loss_two, predictions_two) = results
    assert loss_two.item() == pytest.approx(loss_one.item(), rel=1e-6)
    assert len(predictions_one) == 1 and len(predictions_two) == 2
    assert token_accuracy(predictions_two) == token_accuracy(predictions_one)
    for p1, p2 in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        np.testing.assert_allclose(p2.grad.data, p1.grad.data, rtol=1e-4, atol=1e-6)


def test_dropout_changes_training_so_the_resume_test_covers_its_generator(tmp_path):
    """Guard for the test above: with --dropout 0.1 the masks matter, so a wrongly restored generator would show."""
    flags = [*TINY, "--lr", "3e-3", "--steps", "40", "--eval-every", "10", "--target-accuracy", "1.0", "--stop-at", "20"]
    for name, extra in (("plain", []), ("dropout", ["--dropout", "0.1"])):
        assert run_main([*flags, *extra, "--out", tmp_path / name, "--log", tmp_path / f"{name}.jsonl"])[0] == 0
    assert log_without_elapsed(tmp_path / "plain.jsonl") != log_without_elapsed(tmp_path / "dropout.jsonl")
    state = checkpoint.load(tmp_path / "dropout" / CHECKPOINT_NAME)
    fresh = Run(Config.from_dict(dict(state["config"], device=None)))
    assert state["dropout_generator"] != fresh.model.generator.bit_generator.state  # the generator advanced and was saved


# --- 4. bad input: exit code 2 and one line --------------------------------------------------------

BAD_FLAGS = [
    (["--steps", "-5"], "--steps must be positive"),
    (["--heads", "3", "--d-model", "32"], "--heads (3) must divide --d-model (32)"),
    (["--task", "shuffle"], "--task"),
    (["--min-len", "5", "--max-len", "4"], "--min-len (5) must not exceed --max-len (4)"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--warmup", "50", "--steps", "50"], "--warmup"),
    (["--decode", "1 2 3"], "--checkpoint"),
    (["--evaluate"], "--checkpoint"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
    (["--stop-at", "0"], "--stop-at"),
    (["--steps", "ten"], "--steps"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--threads", "65"], "--threads (65) must not exceed --batch-size (64)"),
    (["--parallel", "fork"], "--parallel: invalid choice: 'fork'"),
    (["--task", "lookup", "--vocab", "10"], "--vocab must be at least 14 for the lookup task with --max-len 16"),
    (["--task", "lookup", "--max-len", "2"], "--max-len must be at least 3 for the lookup task"),
    (["--task", "lookup", "--min-len", "6", "--max-len", "6"], "--min-len (6) leaves no lookup source length up to --max-len (6)"),
    (["--positional", "xpos"], "--positional"),
    (["--eval-max-len", "8"], "--eval-max-len (8) must be at least --max-len (16)"),
    (["--randomized-positions", "10"], "--randomized-positions (10) must be at least 17"),
    (["--model", "gpt", "--eval-max-len", "32", "--randomized-positions", "40"],
     "--randomized-positions (40) must be at least 66: the gpt model's longest sequence, for a source of --eval-max-len 32"),
    (["--positional", "none", "--randomized-positions", "64"], "--randomized-positions has no positions to draw with --positional none"),
    (["--model", "rnn", "--positional", "rope"], "--positional applies to the transformer models (transformer, gpt), not rnn"),
]


def test_the_lookup_task_defaults_to_enough_keys_and_the_encoder_decoder_to_rotary_positions(tmp_path):
    code, stdout, stderr = run_main(["--task", "lookup", "--max-len", "9", "--steps", "2", "--warmup", "0", "--eval-every", "2",
                                     "--eval-size", "8", "--out", tmp_path])
    assert code == 0, stderr
    assert "vocab=10" in stdout.split()  # the default 10 covers 4 keys; 16 would need 14
    code, stdout, stderr = run_main(["--task", "lookup", "--steps", "2", "--warmup", "0", "--eval-every", "2",
                                     "--eval-size", "8", "--out", tmp_path / "b"])
    assert code == 0 and "vocab=14" in stdout.split(), stderr
    assert "positional=rope" in stdout.split()  # the encoder-decoder learns lookup with rotary positions only
    code, stdout, stderr = run_main(["--task", "lookup", "--model", "gpt", "--steps", "2", "--warmup", "0", "--eval-every", "2",
                                     "--eval-size", "8", "--out", tmp_path / "c"])
    assert code == 0 and "positional=learned" in stdout.split(), stderr
    code, stdout, stderr = run_main(["--task", "lookup", "--positional", "learned", "--steps", "2", "--warmup", "0",
                                     "--eval-every", "2", "--eval-size", "8", "--out", tmp_path / "d"])
    assert code == 0 and "positional=learned" in stdout.split(), stderr  # as given


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, named):
    code, stdout, stderr = run_main([*flags, "--out", tmp_path / "out"])
    assert code == 2
    line = error_line(stderr)
    assert line.startswith("train.py: error: ")
    assert named in line
    assert stdout == ""
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_unknown_task_message_lists_the_choices(tmp_path):
    code, _, stderr = run_main(["--task", "shuffle", "--out", tmp_path])
    assert code == 2
    line = error_line(stderr)
    assert "'shuffle'" in line and all(name in line for name in ("copy", "reverse", "sort"))


def test_cuda_without_cupy_says_how_to_install_it(tmp_path):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed here")
    code, stdout, stderr = run_main([*TINY, "--steps", "30", "--device", "cuda", "--out", tmp_path / "out"])
    assert code == 2
    line = error_line(stderr)
    assert "pip install '.[cuda12]'" in line and "'.[cuda13]'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("symbols, named", [("3 x", "integers"), ("1 4", "[0, 4)"), ("-1 2", "[0, 4)"), ("", "[0, 4)"),
                                            ("0 1 2 3 0", "--max-len 4")],
                         ids=["not-a-number", "out-of-range", "negative", "empty", "too-long"])
def test_bad_decode_symbols_exit_2_with_one_line(trained, tmp_path, symbols, named):
    svg = tmp_path / "attention.svg"
    code, stdout, stderr = run_main(["--checkpoint", trained["path"], f"--decode={symbols}", "--svg", svg])
    assert code == 2
    line = error_line(stderr)
    assert line.startswith("train.py: error: --decode") and named in line
    assert not svg.exists()


# --- 5. checkpoint faults: exit code 1, one line naming the file, nothing overwritten --------------

def real_state(trained):
    return checkpoint.load(trained["path"])


def fault_files(trained, folder):
    """name -> (path of a bad checkpoint, words its error must contain)."""
    folder.mkdir()
    files = {}
    files["missing"] = (folder / "missing.npz", "no such file")
    half = folder / "truncated.npz"
    half.write_bytes(trained["bytes"][:len(trained["bytes"]) // 2])
    files["truncated"] = (half, "truncated")
    text = folder / "notes.npz"
    text.write_text("these are my notes, not a checkpoint\n")
    files["text"] = (text, "not an .npz file")
    foreign = folder / "foreign.npz"
    np.savez(foreign, weights=np.ones((2, 3)), bias=np.zeros(3))
    files["foreign-npz"] = (foreign, "not a tinyattn checkpoint")
    pickled = folder / "pickled.npz"
    np.savez(pickled, __format__=np.array(checkpoint.FORMAT), __skeleton__=np.array("{}"),
             evil=np.array([{"a": 1}, None], dtype=object))
    files["pickled-npz"] = (pickled, "pickle")
    raw_pickle = folder / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"model": {}}))
    files["pickle"] = (raw_pickle, "not an .npz file")
    empty = folder / "empty.npz"
    empty.write_bytes(b"")
    files["empty"] = (empty, "not an .npz file")
    files["directory"] = (folder, "directory")

    state = real_state(trained)
    state["config"] = dict(state["config"], d_model=16)
    checkpoint.save(folder / "wrong-config.npz", state)
    files["config-does-not-fit"] = (folder / "wrong-config.npz", "does not fit")
    state = real_state(trained)
    name = sorted(state["model"])[0]
    state["model"][name] = np.zeros(state["model"][name].shape[:-1] + (state["model"][name].shape[-1] + 1,), np.float32)
    checkpoint.save(folder / "wrong-shape.npz", state)
    files["wrong-array-shape"] = (folder / "wrong-shape.npz", "does not fit")
    state = real_state(trained)
    del state["optimizer"]
    checkpoint.save(folder / "no-optimizer.npz", state)
    files["missing-part"] = (folder / "no-optimizer.npz", "does not fit")
    state = real_state(trained)
    first = sorted(state["optimizer"]["state"]["0"])
    slot = next(key for key in first if isinstance(state["optimizer"]["state"]["0"][key], np.ndarray))
    state["optimizer"]["state"]["0"][slot] = np.zeros((7, 7), np.float32)
    checkpoint.save(folder / "bad-optimizer.npz", state)
    files["optimizer-shape"] = (folder / "bad-optimizer.npz", "does not fit")
    state = real_state(trained)
    state["config"] = dict(state["config"], lr=-1.0)
    checkpoint.save(folder / "bad-lr.npz", state)
    files["config-bad-value"] = (folder / "bad-lr.npz", "config that cannot run: 'lr' must be a positive number, got -1.0")
    state = real_state(trained)
    state["config"] = dict(state["config"], learning_rate=0.1)
    checkpoint.save(folder / "unknown-setting.npz", state)
    files["config-unknown-setting"] = (folder / "unknown-setting.npz", "unknown setting 'learning_rate'")
    state = real_state(trained)
    state["config"] = dict(state["config"], steps="many")
    checkpoint.save(folder / "steps-text.npz", state)
    files["config-wrong-type"] = (folder / "steps-text.npz", "'steps' must be int, got 'many'")
    return files


FAULTS = ["missing", "truncated", "text", "foreign-npz", "pickled-npz", "pickle", "empty", "directory",
          "config-does-not-fit", "wrong-array-shape", "missing-part", "optimizer-shape", "config-bad-value",
          "config-unknown-setting", "config-wrong-type"]


@pytest.fixture
def faults(trained, tmp_path):
    return fault_files(trained, tmp_path / "bad")


@pytest.mark.parametrize("how", ["--resume", "--evaluate", "--decode"])
@pytest.mark.parametrize("fault", FAULTS)
def test_checkpoint_faults_exit_1_and_overwrite_nothing(trained, faults, tmp_path, fault, how):
    path, problem = faults[fault]
    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(trained["bytes"])  # an earlier run's checkpoint, which must survive
    bad_folder_before = snapshot(tmp_path / "bad")
    log = tmp_path / "log.jsonl"
    svg = tmp_path / "attention.svg"
    if how == "--resume":
        argv = ["--resume", path, "--out", out, "--log", log]
    elif how == "--evaluate":
        argv = ["--checkpoint", path, "--evaluate"]
    else:
        argv = ["--checkpoint", path, "--decode", "1 2", "--svg", svg]
    code, stdout, stderr = run_main(argv)
    assert code == 1, (stdout, stderr)
    line = error_line(stderr)
    assert line.startswith("train.py: error: ")
    assert str(path) in line
    assert problem in line.lower()
    assert snapshot(out) == {CHECKPOINT_NAME: trained["bytes"]}
    assert snapshot(tmp_path / "bad") == bad_folder_before  # the bad file itself is left as it was
    assert not log.exists() and not svg.exists()
    assert trained["path"].read_bytes() == trained["bytes"]


def test_checkpoint_errors_start_with_the_path(faults):
    for fault in FAULTS:
        path, problem = faults[fault]
        if fault in ("config-does-not-fit", "wrong-array-shape", "missing-part", "optimizer-shape", "directory",
                     "config-bad-value", "config-unknown-setting", "config-wrong-type"):
            continue  # these load fine (or are not files); train.py finds the problem in the config or when restoring
        with pytest.raises(checkpoint.CheckpointError) as caught:
            checkpoint.load(path)
        assert str(caught.value).startswith(f"checkpoint {path}: "), fault
        assert problem in str(caught.value), fault


@pytest.mark.parametrize("flag, value, saved", [("--d-model", "16", "32"), ("--model", "gpt", "transformer"),
                                                ("--task", "reverse", "copy"), ("--lr", "0.5", "0.01")])
def test_resume_with_a_conflicting_flag_names_it(trained, tmp_path, flag, value, saved):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["--resume", trained["path"], flag, value, "--out", out])
    assert code == 1
    line = error_line(stderr)
    assert str(trained["path"]) in line
    assert f"trained with {flag} {saved}, not {value}" in line
    assert not out.exists()
    assert trained["path"].read_bytes() == trained["bytes"]


def test_resume_may_change_run_settings(trained, tmp_path):
    """--steps, --out, --log, --eval-every and the like are the run's, not the model's: a resume may change them."""
    step = checkpoint.load(trained["path"])["step"]
    out = tmp_path / "more"
    code, stdout, stderr = run_main(["--resume", trained["path"], "--steps", step + 10, "--eval-every", "5",
                                     "--out", out, "--log", tmp_path / "log.jsonl", "--target-accuracy", "1.0"])
    assert code == 0, stderr
    assert [entry["step"] for entry in read_log(tmp_path / "log.jsonl")] == [step + 5]  # stopped: already at target
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == step + 5
    assert trained["path"].read_bytes() == trained["bytes"]  # the resumed run wrote to --out, not over its source


# --- 6. a non-finite loss stops training -----------------------------------------------------------

def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint.save

    def recording_save(path, state):
        real_save(path, state)
        saved.append((state["step"], Path(path).read_bytes()))

    monkeypatch.setattr(checkpoint, "save", recording_save)
    out = tmp_path / "out"
    with np.errstate(all="ignore"):
        code, stdout, stderr = run_main([*TINY, "--warmup", "0", "--lr", "1e30", "--steps", "20", "--eval-every", "1",
                                         "--out", out, "--log", tmp_path / "log.jsonl"])
    assert code == 1
    match = re.search(r"error: the loss became (nan|inf|-inf) at step (\d+); stopping \(the last good checkpoint is (.+) "
                      r"\(step (\d+)\)\)", stderr)
    assert match, stderr
    bad_step, kept_step = int(match.group(2)), int(match.group(4))
    assert match.group(3) == str(out / CHECKPOINT_NAME)
    assert kept_step == bad_step - 1 and [step for step, _ in saved] == list(range(1, bad_step))
    assert (out / CHECKPOINT_NAME).read_bytes() == saved[-1][1]  # the earlier eval's checkpoint, untouched
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == kept_step
    assert [entry["step"] for entry in read_log(tmp_path / "log.jsonl")] == list(range(1, bad_step))
    assert "held-out (" not in stdout  # no final summary after a failure


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    with np.errstate(all="ignore"):
        code, stdout, stderr = run_main([*TINY, "--warmup", "0", "--lr", "1e30", "--steps", "20", "--eval-every", "10",
                                         "--out", tmp_path / "out"])
    assert code == 1
    assert re.search(r"the loss became (nan|inf|-inf) at step 2; stopping \(no checkpoint was saved\)", stderr), stderr
    assert not (tmp_path / "out" / CHECKPOINT_NAME).exists()


def test_the_checkpoint_called_last_good_has_finite_weights(tmp_path):
    """With --lr 1e38 the first update already makes every weight NaN; the loss check only sees it one step later,
    after the step-1 evaluation saved those weights, and the message then calls that checkpoint 'the last good' one."""
    out = tmp_path / "out"
    with np.errstate(all="ignore"):
        code, _, stderr = run_main([*TINY, "--warmup", "0", "--lr", "1e38", "--steps", "20", "--eval-every", "1",
                                    "--out", out])
    assert code == 1
    if "last good checkpoint" in stderr:
        state = checkpoint.load(out / CHECKPOINT_NAME)
        bad = [name for name, value in state["model"].items() if not np.isfinite(value).all()]
        assert not bad, f"the 'last good' checkpoint (step {state['step']}) has non-finite weights in {len(bad)} arrays"


# --- 7. Ctrl-C -------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--warmup", "5", "--lr", "3e-3", "--steps", "100000",
                                "--eval-every", "10", "--target-accuracy", "1.0", "--out", out],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(r"step\s+10\s+loss", line):
                break
        assert any(re.search(r"step\s+10\s+loss", line) for line in seen), "".join(seen)
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == training.INTERRUPTED_EXIT, stderr
    path = out / CHECKPOINT_NAME
    assert path.is_file()
    assert "--resume" in stderr and str(path) in stderr
    assert "Traceback" not in stderr
    interrupted = int(re.search(r"interrupted at step (\d+)", stderr).group(1))
    assert interrupted >= 10
    assert checkpoint.load(path)["step"] == interrupted

    code, stdout, stderr = run_main(["--resume", path, "--steps", interrupted + 15, "--eval-every", "10",
                                     "--log", tmp_path / "log.jsonl"])
    assert code == 0, stderr
    final = checkpoint.load(path)
    assert interrupted < final["step"] <= interrupted + 15
    assert re.search(rf"^steps {final['step']}, wall time", stdout, re.M)


# --- 8. decode and the log -------------------------------------------------------------------------

def test_decode_prints_the_answer_a_heatmap_and_writes_an_svg(trained, tmp_path):
    svg = tmp_path / "pictures" / "attention.svg"
    svg.parent.mkdir()
    code, stdout, stderr = run_main(["--checkpoint", trained["path"], "--decode", "3 1 0 2", "--svg", svg])
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "3 1 0 2 -> 3 1 0 2  ✓ (copy)"
    headings = [line for line in lines if line.startswith("cross-attention, layer")]
    assert headings == ["cross-attention, layer 1, head 1 (rows: outputs, columns: inputs)",
                        "cross-attention, layer 1, head 2 (rows: outputs, columns: inputs)"]
    assert any(shade in stdout for shade in "░▒▓█")
    assert f"wrote {svg}" in stdout
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    rects = [element for element in root.iter() if element.tag.split("}")[-1] == "rect"]
    assert len(rects) >= 2 * 5 * 4  # two heads, five output rows (four symbols and EOS), four input columns
    assert trained["path"].read_bytes() == trained["bytes"]


def test_decode_marks_a_wrong_answer_with_the_expected_one(trained, tmp_path):
    """An untrained model's decode is wrong; the line shows ✗ and what was expected."""
    out = tmp_path / "untrained"
    assert run_main([*TINY, "--steps", "2", "--warmup", "0", "--eval-every", "1", "--stop-at", "1", "--out", out])[0] == 0
    code, stdout, stderr = run_main(["--checkpoint", out / CHECKPOINT_NAME, "--decode", "3 1 0 2",
                                     "--svg", tmp_path / "a.svg"])
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert re.fullmatch(r"3 1 0 2 -> .*  ✗ expected 3 1 0 2 \(copy\)", first), first
    ET.parse(tmp_path / "a.svg")


def test_decode_with_the_gpt_model(tmp_path):
    out = tmp_path / "gpt"
    assert run_main([*TINY, "--model", "gpt", "--steps", "2", "--warmup", "0", "--eval-every", "1", "--stop-at", "1",
                     "--out", out])[0] == 0
    svg = tmp_path / "gpt.svg"
    code, stdout, stderr = run_main(["--checkpoint", out / CHECKPOINT_NAME, "--decode", "0 1 2", "--svg", svg])
    assert code == 0, stderr
    assert re.match(r"0 1 2 -> .*[✓✗]", stdout.splitlines()[0])
    assert "attention on the source, layer 1, head 2" in stdout
    assert any(element.tag.split("}")[-1] == "rect" for element in ET.parse(svg).getroot().iter())


def test_log_has_one_json_line_per_evaluation(trained):
    log = read_log(trained["log"])
    summary_steps = int(re.search(r"^steps (\d+),", trained["stdout"], re.M).group(1))
    assert [entry["step"] for entry in log] == list(range(50, summary_steps + 1, 50))
    evals = re.findall(r"step\s+(\d+)\s+loss ([0-9.]+)\s+held-out exact-match ([0-9.]+)", trained["stdout"])
    assert [int(step) for step, _, _ in evals] == [entry["step"] for entry in log]
    for entry, (_, loss, exact) in zip(log, evals):
        assert set(entry) == LOG_KEYS
        assert all(isinstance(entry[key], (int, float)) for key in LOG_KEYS)
        assert f"{entry['loss']:.4f}" == loss and f"{entry['exact_match']:.3f}" == exact
        assert 0.0 <= entry["token_accuracy"] <= 1.0 and entry["exact_match"] <= entry["token_accuracy"] + 1e-12
        assert entry["lr"] > 0 and entry["elapsed"] >= 0
    assert [entry["elapsed"] for entry in log] == sorted(entry["elapsed"] for entry in log)


def test_a_fresh_run_overwrites_its_log_and_a_resumed_one_appends(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 999}\n')
    flags = [*TINY, "--steps", "20", "--eval-every", "10", "--warmup", "5", "--out", tmp_path / "out", "--log", log]
    assert run_main([*flags, "--stop-at", "10"])[0] == 0
    assert [entry["step"] for entry in read_log(log)] == [10]
    assert run_main(["--resume", tmp_path / "out" / CHECKPOINT_NAME, "--log", log])[0] == 0
    assert [entry["step"] for entry in read_log(log)] == [10, 20]


def filmstrip_frames(path):
    """The frames of a --watch SVG: (caption, number of layer panels), after checking it parses."""
    root = ET.parse(path).getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    captions = [text.text for text in root.iter(f"{namespace}text") if text.get("font-weight") == "bold"]
    panels = root.findall(f"{namespace}g[@class='map']")
    return captions, len(panels)


def test_watch_adds_one_frame_per_evaluation_and_a_resumed_run_goes_on_with_them(tmp_path):
    watch, out = tmp_path / "film" / "reverse.svg", tmp_path / "out"
    flags = [*TINY, "--steps", "30", "--eval-every", "10", "--warmup", "5", "--out", out, "--watch", watch]
    code, stdout, stderr = run_main([*flags, "--stop-at", "20"])
    assert code == 0, stderr
    captions, panels = filmstrip_frames(watch)
    exact = [float(x) for x in re.findall(r"held-out exact-match ([0-9.]+)", stdout)]
    assert captions == [f"step {step}, exact-match {value:.0%}" for step, value in zip((10, 20), exact)]
    assert panels == 2  # one layer: a panel per frame
    page = watch.with_suffix(".html").read_text()
    assert 'type="range"' in page and "<script>" in page and "step 20, exact-match" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing from the network
    assert not [p for p in watch.parent.iterdir() if p.suffix == ".tmp"]
    assert run_main(["--resume", out / CHECKPOINT_NAME])[0] == 0  # --watch is a run setting, saved in the checkpoint
    assert [caption.split(",")[0] for caption in filmstrip_frames(watch)[0]] == ["step 10", "step 20", "step 30"]
    assert run_main([*flags, "--steps", "10", "--out", tmp_path / "fresh"])[0] == 0  # a fresh run starts a new filmstrip
    assert [caption.split(",")[0] for caption in filmstrip_frames(watch)[0]] == ["step 10"]


def test_watch_is_refused_for_a_model_without_attention_and_for_a_folder(tmp_path):
    code, _, stderr = run_main([*TINY, "--model", "rnn", "--watch", tmp_path / "a.svg", "--out", tmp_path / "out"])
    assert code == 2 and "--watch draws attention maps, and the rnn model has none" in error_line(stderr)
    code, _, stderr = run_main([*TINY, "--steps", "10", "--warmup", "5", "--watch", tmp_path, "--out", tmp_path / "out"])
    assert code == 1 and error_line(stderr) == f"train.py: error: --watch {tmp_path} is a folder, not a file"


def test_a_short_lookup_run_learns_to_match_the_query_beyond_guessing(tmp_path):
    flags = ["--task", "lookup", "--vocab", "6", "--max-len", "7", "--model", "gpt", "--d-model", "32", "--heads", "2",
             "--layers", "2", "--d-ff", "64", "--batch-size", "32", "--eval-size", "128", "--steps", "400",
             "--eval-every", "400", "--warmup", "20", "--by-length", "--out", tmp_path]
    code, stdout, stderr = run_main(flags)
    assert code == 0, stderr
    table = stdout.split("source length  sequences  exact-match  token accuracy\n")[1].splitlines()
    exact = {int(line.split()[0]): float(line.split()[2].rstrip("%")) / 100 for line in table}
    assert sorted(exact) == [3, 5, 7]  # 1 to 3 pairs
    assert exact[5] > 0.5 + 0.15 and exact[7] > 1 / 3 + 0.15  # a guess among the values present gets 1/2 and 1/3


def test_rnn_models_train_and_report_accuracy_by_length(tmp_path, capsys):
    common = ["--task", "copy", "--vocab", "4", "--min-len", "1", "--max-len", "4", "--d-model", "24", "--batch-size", "32",
              "--eval-size", "64", "--steps", "60", "--eval-every", "60", "--warmup", "10", "--by-length"]
    for name in ("rnn", "rnn-attention"):
        assert train.main(common + ["--model", name, "--out", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert f"model: {name}" in out
        table = out.split("source length  sequences  exact-match  token accuracy\n")[1].splitlines()
        assert [int(line.split()[0]) for line in table] == [1, 2, 3, 4]  # one row per source length
    assert train.main(["--checkpoint", str(tmp_path / "rnn" / "checkpoint.npz"), "--decode", "1 2", "--svg", str(tmp_path / "a.svg")]) == 0
    assert "no attention to draw" in capsys.readouterr().out
    assert train.main(["--checkpoint", str(tmp_path / "rnn-attention" / "checkpoint.npz"), "--decode", "1 2",
                       "--svg", str(tmp_path / "b.svg")]) == 0
    assert "additive attention, layer 1, head 1" in capsys.readouterr().out
    assert (tmp_path / "b.svg").exists()


def test_a_checkpoint_from_before_the_bidirectional_encoder_loads_one_directional(tmp_path):
    flags = ["--task", "copy", "--vocab", "4", "--max-len", "4", "--model", "rnn-attention", "--d-model", "8",
             "--batch-size", "16", "--eval-size", "16", "--steps", "20", "--eval-every", "10", "--warmup", "2"]
    assert run_main([*flags, "--no-bidirectional", "--out", tmp_path, "--stop-at", "10"])[0] == 0
    path = tmp_path / CHECKPOINT_NAME
    state = checkpoint.load(path)
    del state["config"]["bidirectional"]  # as written before the setting existed
    checkpoint.save(path, state)
    code, stdout, stderr = run_main(["--checkpoint", path, "--decode", "1 2", "--svg", tmp_path / "a.svg"])
    assert code == 0, stderr
    code, _, stderr = run_main(["--resume", path, "--bidirectional"])
    assert code == 1 and "was trained with --no-bidirectional, not --bidirectional" in error_line(stderr)
    assert run_main(["--resume", path])[0] == 0
    assert checkpoint.load(path)["config"]["bidirectional"] is False and checkpoint.load(path)["step"] == 20
    state["config"]["bidirectional"] = True  # one-directional weights under a config that says otherwise
    checkpoint.save(tmp_path / "mislabelled.npz", state)
    code, _, stderr = run_main(["--checkpoint", tmp_path / "mislabelled.npz", "--evaluate"])
    assert code == 1 and "does not fit the model" in error_line(stderr)


# --- the kernels switch from the command line --------------------------------------------------------

def test_kernels_composed_trains_with_engine_ops_alone_and_the_checkpoint_serves_both_paths(tmp_path, function_calls):
    results = []
    calls = function_calls(lambda: results.append(run_main([*TINY, "--lr", "1e-2", "--steps", "800", "--eval-every", "50",
                                                            "--target-accuracy", "1.0", "--kernels", "composed",
                                                            "--out", tmp_path / "run"])))
    names = {name for _, name in calls}
    code, stdout, stderr = results[0]
    assert code == 0, stderr
    assert "composed kernels" in stdout
    assert float(HELD_OUT.search(stdout).group(2)) == 100.0
    assert names and not any(name.startswith("Fused") for name in names)  # nothing but engine ops ran
    path = tmp_path / "run" / CHECKPOINT_NAME
    assert checkpoint.load(path)["config"]["kernels"] == "composed"
    reports = {}
    for kind in ("fused", "composed"):
        code, stdout, stderr = run_main(["--checkpoint", path, "--evaluate", "--kernels", kind])
        assert code == 0, stderr
        reports[kind] = EVALUATED.search(stdout).groups()
        code, stdout, stderr = run_main(["--checkpoint", path, "--decode", "1 2 3", "--kernels", kind, "--svg", tmp_path / f"{kind}.svg"])
        assert code == 0 and "1 2 3 -> 1 2 3  ✓" in stdout, stdout + stderr
    assert reports["fused"] == reports["composed"] == ("100.0", "64")


def test_a_resumed_run_may_switch_kernels(trained, tmp_path):
    code, stdout, stderr = run_main(["--resume", trained["path"], "--kernels", "composed", "--steps", "900",
                                     "--stop-at", str(checkpoint.load(trained["path"])["step"] + 10), "--out", tmp_path])
    assert code == 0, stderr
    assert "composed kernels" in stdout


def test_an_unknown_kernels_value_is_one_line():
    code, _, stderr = run_main(["--kernels", "fast"])
    assert code == 2 and "--kernels" in error_line(stderr) and "fused" in error_line(stderr)


# --- positions, and lengths never trained on ---------------------------------------------------------

def by_length_rows(stdout):
    """The source lengths of a --by-length table."""
    return [int(line.split()[0]) for line in stdout.split("source length  sequences  exact-match  token accuracy\n")[1].splitlines()
            if line.strip() and line.split()[0].isdigit()]


def test_a_rope_run_is_evaluated_past_its_training_lengths_and_its_checkpoint_records_the_positions(tmp_path):
    out = tmp_path / "rope"
    code, stdout, stderr = run_main([*TINY, "--positional", "rope", "--eval-max-len", "6", "--steps", "30",
                                     "--eval-every", "30", "--by-length", "--out", out])
    assert code == 0, stderr
    assert by_length_rows(stdout) == [1, 2, 3, 4, 5, 6]  # trained on 1..4
    path = out / CHECKPOINT_NAME
    config = checkpoint.load(path)["config"]
    assert (config["positional"], config["randomized_positions"], config["eval_max_len"]) == ("rope", None, 6)
    # positions inside attention need no table: a checkpoint is evaluated as far as asked, and decodes as long
    code, stdout, stderr = run_main(["--checkpoint", path, "--evaluate", "--by-length", "--eval-max-len", "9"])
    assert code == 0, stderr
    assert by_length_rows(stdout) == list(range(1, 10))
    code, stdout, stderr = run_main(["--checkpoint", path, "--decode", "0 1 2 3 0 1 2", "--svg", tmp_path / "a.svg"])
    assert code == 2 and "--decode got 7 symbols; this run takes sources of at most --eval-max-len 6" in error_line(stderr)
    code, stdout, stderr = run_main(["--checkpoint", path, "--decode", "0 1 2 3 0 1 2", "--eval-max-len", "7",
                                     "--svg", tmp_path / "a.svg"])
    assert code == 0 and stdout.startswith("0 1 2 3 0 1 2 -> "), stderr


def test_learned_positions_refuse_an_eval_max_len_their_table_was_not_made_for(trained):
    for asked, beyond in (("8", ", and positions past those do not exist"), ("4", "")):
        code, stdout, stderr = run_main(["--checkpoint", trained["path"], "--evaluate", "--eval-max-len", asked])
        if asked == "4":  # the training maximum is what the table was made for
            assert code == 0, stderr
            continue
        assert code == 2 and stdout == ""
        assert error_line(stderr) == (f"train.py: error: --eval-max-len ({asked}) must stay 4 for {trained['path']}: its learned "
                                      f"positions were made for sources up to 4{beyond}")


def test_a_checkpoint_saved_before_the_positional_settings_loads_with_their_defaults(trained, tmp_path):
    state = checkpoint.load(trained["path"])
    for setting in ("positional", "randomized_positions", "eval_max_len"):
        del state["config"][setting]
    old = tmp_path / "old.npz"
    checkpoint.save(old, state)
    code, stdout, stderr = run_main(["--checkpoint", old, "--evaluate"])
    assert code == 0, stderr
    assert EVALUATED.search(stdout).groups() == ("100.0", "64")


def test_randomized_positions_train_and_are_drawn_at_evaluation_too(tmp_path):
    out = tmp_path / "randomized"
    code, stdout, stderr = run_main([*TINY, "--randomized-positions", "16", "--eval-max-len", "6", "--steps", "30",
                                     "--eval-every", "30", "--by-length", "--out", out])
    assert code == 0, stderr
    assert by_length_rows(stdout) == [1, 2, 3, 4, 5, 6]
    code, stdout, stderr = run_main(["--checkpoint", out / CHECKPOINT_NAME, "--evaluate", "--eval-max-len", "20"])
    assert code == 2  # positions are drawn from 0..15: a source of 20 needs 21
    assert "--randomized-positions (16) must be at least 21" in error_line(stderr)
