"""train.py fails in one line, never a traceback: hostile checkpoints, sizes that cannot fit,
unusable --out and --log, Ctrl-C outside training, TINYATTN_DEVICE, the default warmup,
and a diverging loss flagged while the best checkpoint is kept.

The runs are tests/test_train.py's tiny copy task; the Ctrl-C tests run train.py in a
subprocess where a real signal is needed.
"""
import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import train
from models import Config, build_model, memory, training
from models.training import BEST_NAME, CHECKPOINT_NAME, Run
from test_train import ROOT, TINY, error_after_bar, error_line, run_main, snapshot
from tinyattn import backend, checkpoint
from tinyattn.tasks import FIRST_SYMBOL

FLAGS = [*TINY, "--lr", "3e-3", "--steps", "40", "--eval-every", "10", "--target-accuracy", "1.0"]
ROOMY = (64 * 2**30, "a test's 64 GB")



@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 10 of 40 (its warmup 20): the checkpoint's bytes."""
    out = tmp_path_factory.mktemp("stopped") / "runs"
    code, _, stderr = run_main([*FLAGS, "--stop-at", "10", "--out", out])
    assert code == 0, stderr
    return (out / CHECKPOINT_NAME).read_bytes()


def state_of(data, tmp_path):
    path = tmp_path / "source.npz"
    path.write_bytes(data)
    return checkpoint.load(path)


def with_zip_method(data, method):
    """The checkpoint's bytes with every entry's compression method set to `method` (headers only)."""
    data = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(signature)
        while at >= 0:
            struct.pack_into("<H", data, at + offset, method)
            at = data.find(signature, at + 4)
    return bytes(data)


def set_in(state, keys, value):
    part = state
    for key in keys[:-1]:
        part = part[key]
    part[keys[-1]] = value
    return state


def first_weight(state):
    return sorted(state["model"])[0]


def hostile(name, data, tmp_path):
    """(path of a hostile checkpoint, words its one line must hold)."""
    path = tmp_path / f"{name}.npz"
    state = state_of(data, tmp_path)
    weight = first_weight(state)
    if name == "zip-method-deflate64":
        path.write_bytes(with_zip_method(data, 9))
        return path, "uses zip compression method 9"
    if name == "zip-method-unknown":
        path.write_bytes(with_zip_method(data, 99))
        return path, "uses zip compression method 99"
    if name == "skeleton-deep":
        np.savez(path, __format__=np.array(checkpoint.FORMAT), __skeleton__=np.array('{"a":' * 100_000 + "1" + "}" * 100_000))
        return path, "nested too deeply"
    changes = {
        "skeleton-list": (None, [1, 2], "holds a list"),
        "config-d-model-text": (("config", "d_model"), "32", "'d_model' must be int, got '32'"),
        "config-unknown-model": (("config", "model"), "lstm", "'model' must be one of"),
        "config-unknown-task": (("config", "task"), "shuffle", "'task' must be one of"),
        "config-heads-zero": (("config", "heads"), 0, "'heads' must be positive, got 0"),
        "weight-nan": (("model", weight), np.full_like(state["model"][weight], np.nan), f"weight {weight!r} holds"),
        "weight-inf": (("model", weight), np.full_like(state["model"][weight], np.inf), "nan or infinite"),
        "weight-integers": (("model", weight), state["model"][weight].astype(np.int64), "int64 values, not floating point"),
        "adam-moment-nan": (("optimizer", "state", "0", "exp_avg_sq"),
                            np.full_like(state["optimizer"]["state"]["0"]["exp_avg_sq"], np.nan), "'exp_avg_sq' of parameter 0"),
        "adam-moment-inf": (("optimizer", "state", "1", "exp_avg"),
                            np.full_like(state["optimizer"]["state"]["1"]["exp_avg"], -np.inf), "'exp_avg' of parameter 1"),
        "adam-moment-number": (("optimizer", "state", "0", "exp_avg"), 0.5, "is float, not an array"),
        "step-negative": (("step",), -5, "its step is -5"),
        "step-absurd": (("step",), 10**18, "its step is 1000000000000000000"),
        "step-text": (("step",), "ten", "its step is 'ten'"),
        "adam-step-negative": (("optimizer", "state", "0", "step"), -1, "'step' of parameter 0 is -1"),
        "elapsed-nan": (("elapsed",), float("nan"), "elapsed time is nan"),
        "best-record": (("best",), {"step": 99, "exact_match": 2.0}, "record of the best evaluation"),
        "generator-state": (("data", "state", "state"), -1, "does not fit"),
    }
    keys, value, words = changes[name]
    checkpoint.save(path, value if keys is None else set_in(state, keys, value))
    return path, words


HOSTILE = ["zip-method-deflate64", "zip-method-unknown", "skeleton-deep", "skeleton-list", "config-d-model-text",
           "config-unknown-model", "config-unknown-task", "config-heads-zero", "weight-nan", "weight-inf",
           "weight-integers", "adam-moment-nan", "adam-moment-inf", "adam-moment-number", "step-negative",
           "step-absurd", "step-text", "adam-step-negative", "elapsed-nan", "best-record", "generator-state"]


# --- 1. hostile checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["--resume", "--evaluate"])
@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_checkpoint_is_one_line_naming_the_file_and_its_contents(stopped, tmp_path, name, how):
    path, words = hostile(name, stopped, tmp_path)
    before = path.read_bytes()
    out = tmp_path / "out"
    argv = ["--resume", path, "--out", out] if how == "--resume" else ["--checkpoint", path, "--evaluate"]
    code, stdout, stderr = run_main(argv)
    assert code == 1, (stdout, stderr)
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: checkpoint {path}: "), line
    assert words.lower() in line.lower(), line
    assert not re.search(r"--[a-z]", line), line  # the checkpoint's settings, not flags the user never gave
    assert path.read_bytes() == before and not out.exists()


def test_the_checkpoint_loader_alone_names_the_zip_method_and_the_depth(stopped, tmp_path):
    for name in ("zip-method-deflate64", "skeleton-deep"):
        path, words = hostile(name, stopped, tmp_path)
        with pytest.raises(checkpoint.CheckpointError, match=words):
            checkpoint.load(path)


# --- 2. flags: a negative seed, sizes that cannot fit ---------------------------------------------------

def test_a_negative_seed_is_one_line(tmp_path):
    code, stdout, stderr = run_main([*TINY, "--seed", "-1", "--out", tmp_path / "out"])
    assert code == 2 and stdout == ""
    assert error_line(stderr) == "train.py: error: --seed must be at least 0, got -1"


HUGE = [("--max-len", "100000", "activations"), ("--vocab", "10000000", "activations"),
        ("--d-model", "100000", "parameters"), ("--d-ff", "100000000", "activations"),
        ("--batch-size", "100000000", "activations"), ("--eval-size", "100000000", "held-out set"),
        ("--layers", "100000", "activations")]


@pytest.mark.parametrize("flag, value, part", HUGE, ids=[flag for flag, _, _ in HUGE])
def test_a_size_that_cannot_fit_is_refused_at_once_naming_estimate_and_limit(tmp_path, monkeypatch, flag, value, part):
    monkeypatch.setattr(memory, "available_memory", lambda: ROOMY)  # the same on every machine
    started = time.perf_counter()
    code, stdout, stderr = run_main([flag, value, "--out", tmp_path / "out"])
    assert time.perf_counter() - started < 5  # nothing was allocated to find out
    assert code == 2 and stdout == ""
    line = error_line(stderr)
    assert re.match(r"train\.py: error: this run needs about [0-9.,]+ [GT]B of memory, more than the 64\.0 GB available "
                    r"\(a test's 64 GB\): the largest part is ", line), line
    assert part in line and f"make {flag}" in line  # the flag given is named first
    assert not (tmp_path / "out").exists()


def test_the_memory_check_uses_this_machines_figure(tmp_path):
    limit, source = memory.available_memory()
    if limit is None:
        pytest.skip(source)
    code, _, stderr = run_main(["--max-len", "100000", "--out", tmp_path / "out"])
    assert code == 2
    assert f" available ({source}): " in error_line(stderr)


def test_a_checkpoint_too_big_for_this_machine_names_the_file(stopped, tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    path.write_bytes(stopped)
    monkeypatch.setattr(memory, "available_memory", lambda: (1, "a test's 1 byte"))
    code, _, stderr = run_main(["--checkpoint", path, "--evaluate"])
    assert code == 1
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: checkpoint {path}: its config needs about ") and "a test's 1 byte" in line
    code, _, stderr = run_main(["--resume", path, "--eval-size", "100000000", "--out", tmp_path / "out"])
    assert code == 2 and "make --eval-size" in error_line(stderr)  # a run setting given now is the flag's fault


def test_unknown_memory_is_said_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: (None, "no figure here"))
    code, _, stderr = run_main([*FLAGS, "--steps", "30", "--out", tmp_path / "out"])
    assert code == 0, stderr
    assert re.search(r"train\.py: note: this run needs about [0-9.]+ MB of memory; no figure here, so it was not checked", stderr)


def test_available_memory_reads_meminfo_then_sysconf(monkeypatch):
    limit, source = memory.available_memory()
    if sys.platform.startswith("linux"):
        assert source == "MemAvailable in /proc/meminfo" and limit > 0
    real_open = open

    def no_meminfo(path, *args, **kwargs):
        if path == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_meminfo)
    limit, source = memory.available_memory()
    assert limit is None or limit > 0 and source.startswith("the system's")
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert memory.available_memory() == (None, "neither /proc/meminfo nor os.sysconf reports the memory available")


SIZES = [dict(d_model=32, heads=2, layers=1, d_ff=64, vocab=4, max_len=4), dict(), dict(d_model=48, heads=3, layers=3, d_ff=100, vocab=7, max_len=9)]


@pytest.mark.parametrize("model", ["transformer", "gpt", "rnn", "rnn-attention"])
def test_the_estimate_counts_every_parameter(model):
    for sizes in SIZES:
        config = Config(model=model, **sizes)
        assert memory.parameter_count(config) == build_model(config, config.vocab + FIRST_SYMBOL).num_parameters()


@pytest.mark.parametrize("model", ["transformer", "gpt", "rnn", "rnn-attention"])
def test_the_estimate_covers_a_measured_step_and_evaluation(model):
    config = Config(model=model, kernels="composed", threads=1, eval_size=128, max_len=12)
    tracemalloc.start()
    try:
        run = Run(config)
        run.train_step()
        run.train_step()
        run.evaluate(run.eval_set())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimated = sum(memory.estimate(config).values()) - memory.INTERPRETER
    assert peak <= estimated <= 4 * peak, (peak, memory.estimate(config))


# --- 3. --out and --log that cannot be written ------------------------------------------------------------

def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: read-only for a user, /sys for root."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("root, and no /sys to stand for an unwritable folder")
        return Path("/sys/kernel/tinyattn-test")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "sub"


def out_case(case, tmp_path):
    """(argv fragment, the path the message must name, words)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    if case == "out-is-a-file":
        return ["--out", a_file], a_file, "is a file, not a folder"
    if case == "out-under-a-file":
        return ["--out", a_file / "runs"], a_file, "is a file, not a folder"
    if case == "out-unwritable":
        folder = unwritable_folder(tmp_path)
        return ["--out", folder], folder, "cannot "
    if case == "log-is-a-folder":
        return ["--out", tmp_path / "out", "--log", tmp_path], tmp_path, "is a folder, not a file"
    if case == "log-under-a-file":
        return ["--out", tmp_path / "out", "--log", a_file / "log.jsonl"], a_file, "is a file, not a folder"
    if case == "log-unwritable":
        path = unwritable_folder(tmp_path) / "log.jsonl"
        return ["--out", tmp_path / "out", "--log", path], path, "cannot "
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "out-unwritable", "log-is-a-folder",
                                  "log-under-a-file", "log-unwritable"])
def test_an_unusable_out_or_log_is_refused_before_the_first_step_naming_it(tmp_path, case):
    argv, named, words = out_case(case, tmp_path)
    code, stdout, stderr = run_main([*FLAGS, *argv])
    assert code == 1, (stdout, stderr)
    line = error_line(stderr)
    assert line.startswith("train.py: error: ") and str(named) in line and words in line, line
    assert checkpoint.TEMPORARY_PREFIX not in line and ".lock" not in line
    assert "config:" not in stdout  # before the run began
    if case.startswith("log"):
        assert snapshot(tmp_path / "out") == {}  # the folder may be made, but nothing is written in it


@pytest.mark.parametrize("flag", ["--out", "--log"])
def test_a_full_disk_is_refused_before_the_first_step(tmp_path, monkeypatch, flag):
    real_usage = shutil.disk_usage
    full = tmp_path / ("out" if flag == "--out" else "logs")
    free = 0 if flag == "--out" else 4096

    def disk_usage(path):
        usage = real_usage(path)
        return usage._replace(free=free) if Path(path).resolve() == full.resolve() else usage

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    log = tmp_path / "logs" / "log.jsonl"
    code, stdout, stderr = run_main([*FLAGS, "--out", tmp_path / "out", "--log", log])
    assert code == 1
    line = error_line(stderr)
    if flag == "--out":
        assert re.fullmatch(rf"train\.py: error: --out {re.escape(str(tmp_path / 'out'))}: its disk has 0\.0 KB free, "
                            r"and a checkpoint of this run takes about [0-9.]+ KB", line), line
    else:
        assert line == f"train.py: error: --log {log}: its disk is full (4.0 KB free)"
    assert not log.exists() and snapshot(tmp_path / "out") == {}


def test_a_save_that_fails_mid_run_names_the_checkpoint_not_its_temporary(tmp_path, monkeypatch):
    real_save = checkpoint.save

    def save(path, state):
        if state["step"] == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path).parent / ".checkpoint-x1y2.npz.tmp"))
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    out = tmp_path / "out"
    code, _, stderr = run_main([*FLAGS, "--out", out])
    assert code == 1
    assert error_after_bar(stderr) == (f"train.py: error: cannot save {out / CHECKPOINT_NAME}: No space left on device; "
                                       "the last checkpoint saved is step 10")
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == 10


# --- 4. Ctrl-C outside training -----------------------------------------------------------------------------

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["building the model", "the held-out set", "locking --out"])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, monkeypatch, where):
    target = {"building the model": (training, "build_model"), "the held-out set": (Run, "eval_set"),
              "locking --out": (training, "claim_outputs")}[where]
    monkeypatch.setattr(*target, interrupt)
    code, stdout, stderr = run_main([*FLAGS, "--out", tmp_path / "out"])
    assert code == 130
    assert error_line(stderr) == "train.py: interrupted before the first step; nothing was saved"
    assert not (tmp_path / "out" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("how", ["--evaluate", "--decode"])
def test_ctrl_c_while_inspecting_is_one_line_and_130(stopped, tmp_path, monkeypatch, how):
    path = tmp_path / "c.npz"
    path.write_bytes(stopped)
    monkeypatch.setattr(Run, "evaluate" if how == "--evaluate" else "greedy_decode", interrupt)
    argv = ["--checkpoint", path, "--evaluate"] if how == "--evaluate" else ["--checkpoint", path, "--decode", "1 2",
                                                                              "--svg", tmp_path / "a.svg"]
    code, _, stderr = run_main(argv)
    assert code == 130
    assert error_line(stderr) == "train.py: interrupted; nothing was written"


def test_ctrl_c_during_a_final_evaluation_says_what_is_saved(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    code, _, stderr = run_main([*FLAGS, "--stop-at", "30", "--out", out])
    assert code == 0, stderr
    before = (out / CHECKPOINT_NAME).read_bytes()
    monkeypatch.setattr(Run, "evaluate", interrupt)
    code, _, stderr = run_main(["--resume", out / CHECKPOINT_NAME, "--steps", "25"])  # at step 30: only the summary is left
    assert code == 130
    assert error_after_bar(stderr) == "train.py: interrupted during the final evaluation; this run saved nothing"
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_a_real_sigint_during_evaluate_is_one_line_and_130(stopped, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(stopped)
    process = subprocess.Popen([sys.executable, "train.py", "--checkpoint", str(path), "--evaluate", "--eval-size", "2000000"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # imports, loading, then the long evaluation: any of them, one line
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert error_line(stderr) in ("train.py: interrupted; nothing was written",
                                  "train.py: interrupted while starting; nothing was written")


def test_ctrl_c_while_the_imports_load_is_one_line_and_130():
    script = ("import sys, runpy\n"
              "class Stop:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'tinyattn':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, Stop())\n"
              "sys.argv = ['train.py']\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert error_line(result.stderr) == "train.py: interrupted while starting; nothing was written"


# --- 5. TINYATTN_DEVICE ----------------------------------------------------------------------------------------

def test_a_bad_tinyattn_device_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYATTN_DEVICE", "bogus")
    monkeypatch.setattr(backend, "_default_device", None)
    code, _, stderr = run_main([*FLAGS, "--out", tmp_path / "out"])
    assert code == 2
    assert error_line(stderr) == ("train.py: error: TINYATTN_DEVICE=bogus: unknown device 'bogus'; "
                                  "expected one of cpu, cuda")


# --- 6. the default warmup follows --steps -------------------------------------------------------------------

def test_the_default_warmup_is_a_tenth_of_steps_at_most_100(tmp_path):
    flags = [flag for flag in TINY]
    del flags[flags.index("--warmup"):flags.index("--warmup") + 2]
    code, stdout, stderr = run_main([*flags, "--steps", "50", "--eval-every", "50", "--out", tmp_path / "out"])
    assert code == 0, stderr
    assert " warmup=5 " in " ".join(line.strip() for line in stdout.splitlines() if not line.startswith("model:"))
    assert train.default_warmup(1500) == 100 == train.DEFAULTS.warmup and train.default_warmup(5) == 0
    assert "a tenth of --steps, at most 100" in " ".join(train.build_parser().format_help().split())


def test_resuming_with_steps_at_or_below_the_saved_warmup_says_what_to_give(stopped, tmp_path):
    path = tmp_path / "runs" / CHECKPOINT_NAME
    path.parent.mkdir()
    path.write_bytes(stopped)
    code, stdout, stderr = run_main(["--resume", path, "--steps", "20"])
    assert code == 2 and stdout == ""
    assert error_line(stderr) == (f"train.py: error: --steps (20) must be more than the warmup of {path} (20 steps, "
                                  "fixed once trained): give --steps above 20")
    assert path.read_bytes() == stopped


# --- 7. a diverging loss is flagged; the best checkpoint is kept --------------------------------------------------

def test_an_exploding_loss_is_flagged_once(tmp_path):
    code, stdout, stderr = run_main([*TINY, "--lr", "10", "--warmup", "0", "--steps", "30", "--eval-every", "10",
                                     "--out", tmp_path / "out"])
    assert code == 0, stderr
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, stdout
    assert re.fullmatch(r"warning: the loss is [0-9.e+]+ at step \d+, over 10x its best so far \([0-9.]+\): training is "
                        r"diverging; a lower --lr \(now 10\) or --grad-clip may help", warnings[0])


def test_a_healthy_run_is_not_flagged(tmp_path):
    code, stdout, _ = run_main([*FLAGS, "--out", tmp_path / "out"])
    assert code == 0 and "warning:" not in stdout


def scripted_exact_matches(monkeypatch, values):
    """Run.evaluate returns these exact-matches in turn (and a real result's other fields)."""
    real, values = Run.evaluate, list(values)

    def evaluate(self, batches):
        result = real(self, batches)
        return dict(result, exact_match=values.pop(0)) if values else result

    monkeypatch.setattr(Run, "evaluate", evaluate)


def test_the_best_checkpoint_is_kept_beside_the_latest(tmp_path, monkeypatch):
    scripted_exact_matches(monkeypatch, [0.5, 0.9, 0.4, 0.95])
    seen = []
    real_save = checkpoint.save

    def save(path, state):
        best = Path(path).parent / BEST_NAME
        seen.append((state["step"], checkpoint.load(best)["step"] if best.exists() else None))
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    out = tmp_path / "out"
    code, _, stderr = run_main([*FLAGS, "--out", out])
    assert code == 0, stderr
    # as each save begins: (its step, best.npz's step); step 30 falls below half of step 20, which is kept first
    assert seen == [(10, None), (20, None), (30, 20), (40, 20)]
    assert sorted(os.listdir(out)) == [CHECKPOINT_NAME]  # step 40 is the best: the older best is gone
    assert checkpoint.load(out / CHECKPOINT_NAME)["best"] == {"step": 40, "exact_match": 0.95}


def test_a_dip_that_is_noise_keeps_no_best_but_a_flagged_run_does(tmp_path, monkeypatch):
    scripted_exact_matches(monkeypatch, [0.28, 0.0, 0.8, 0.7])
    code, _, stderr = run_main([*FLAGS, "--out", tmp_path / "calm"])
    assert code == 0, stderr
    assert os.listdir(tmp_path / "calm") == [CHECKPOINT_NAME]
    scripted_exact_matches(monkeypatch, [0.5, 0.45, 0.4])
    code, stdout, stderr = run_main([*TINY, "--lr", "10", "--warmup", "0", "--steps", "30", "--eval-every", "10",
                                     "--out", tmp_path / "diverging"])
    assert code == 0 and "warning: the loss is" in stdout
    assert checkpoint.load(tmp_path / "diverging" / BEST_NAME)["step"] == 10


def test_best_survives_a_resume_in_its_folder_and_starts_afresh_elsewhere(tmp_path, monkeypatch):
    scripted_exact_matches(monkeypatch, [0.5, 0.8, 0.3])
    out = tmp_path / "out"
    code, _, stderr = run_main([*FLAGS, "--stop-at", "30", "--out", out])
    assert code == 0, stderr
    assert checkpoint.load(out / BEST_NAME)["step"] == 20
    scripted_exact_matches(monkeypatch, [0.7])  # still below step 20's 0.8
    code, _, stderr = run_main(["--resume", out / CHECKPOINT_NAME])
    assert code == 0, stderr
    assert checkpoint.load(out / BEST_NAME)["step"] == 20 and checkpoint.load(out / CHECKPOINT_NAME)["step"] == 40
    copy_folder = tmp_path / "copy"
    copy_folder.mkdir()
    shutil.copy(out / BEST_NAME, copy_folder / "from-best.npz")
    scripted_exact_matches(monkeypatch, [0.1, 0.2])
    code, _, stderr = run_main(["--resume", copy_folder / "from-best.npz", "--out", tmp_path / "elsewhere"])
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path / "elsewhere")) == [CHECKPOINT_NAME]  # its own record: 0.2 at step 40 is its best
    assert checkpoint.load(tmp_path / "elsewhere" / CHECKPOINT_NAME)["best"] == {"step": 40, "exact_match": 0.2}
