"""train.py never loses work: copied checkpoints, --stop-at, two runs at once, signals, a failing log, empty checkpoints.

The runs are tests/test_train.py's tiny copy task (a second or two each); the signal
tests run train.py in a subprocess and stop it once it has saved its first checkpoint.
"""
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models import lock, training
from models.training import CHECKPOINT_NAME
from test_parallel import stat_fields
from test_train import ROOT, TINY, assert_same_state, error_after_bar, error_line, read_log, run_main, snapshot
from tinyattn import checkpoint

FLAGS = [*TINY, "--lr", "3e-3", "--steps", "40", "--eval-every", "10", "--target-accuracy", "1.0"]
LOCK = lock.FOLDER_LOCK_NAME





@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 20 of 40: its checkpoint's bytes."""
    out = tmp_path_factory.mktemp("stopped") / "runs"
    code, _, stderr = run_main([*FLAGS, "--stop-at", "20", "--out", out])
    assert code == 0, stderr
    return (out / CHECKPOINT_NAME).read_bytes()


def place(data, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def start_train(out, *extra, new_session=False):
    """train.py in a subprocess (in a session and process group of its own with new_session),
    returned once it has printed its step-10 evaluation and saved it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--warmup", "5", "--steps", "100000", "--eval-every", "10",
                                "--target-accuracy", "1.0", "--out", str(out), *map(str, extra)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=new_session)
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(r"step\s+10\s+loss", line):
            while time.monotonic() < deadline and not (Path(out) / CHECKPOINT_NAME).exists():
                time.sleep(0.01)
            return process
    process.kill()
    raise AssertionError("".join(seen) + process.communicate()[1])


# --- 1. a resumed copy never overwrites newer work ----------------------------------------------------

def test_resuming_a_copy_writes_beside_it_and_leaves_the_newer_run_alone(stopped, tmp_path):
    runs = place(stopped, tmp_path / "runs" / CHECKPOINT_NAME)
    copy = place(stopped, tmp_path / "backup" / "step20.npz")
    assert run_main(["--resume", runs])[0] == 0  # the original run carries on to step 40 in runs/
    newer = runs.read_bytes()
    assert checkpoint.load(runs)["step"] == 40
    code, stdout, stderr = run_main(["--resume", copy, "--stop-at", "30"])
    assert code == 0, stderr
    assert runs.read_bytes() == newer
    assert copy.read_bytes() == stopped  # the copy itself is kept too
    beside = tmp_path / "backup" / CHECKPOINT_NAME
    assert checkpoint.load(beside)["step"] == 30
    assert checkpoint.load(beside)["config"]["out"] == str(tmp_path / "backup")
    assert f"--resume {beside}" in stdout


def test_a_resume_refuses_to_replace_a_later_checkpoint(stopped, tmp_path):
    runs = place(stopped, tmp_path / "runs" / CHECKPOINT_NAME)
    copy = place(stopped, tmp_path / "backup" / "step20.npz")
    assert run_main(["--resume", runs])[0] == 0
    before = snapshot(tmp_path / "runs")
    code, stdout, stderr = run_main(["--resume", copy, "--out", tmp_path / "runs"])
    assert code == 1
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: checkpoint {runs}: ") and "step 40" in line and "--out" in line
    assert snapshot(tmp_path / "runs") == before and stdout == ""
    # an earlier checkpoint is the resumed run's to replace
    code, _, stderr = run_main(["--resume", runs, "--steps", "50", "--out", tmp_path / "backup"])
    assert code == 0, stderr
    assert checkpoint.load(tmp_path / "backup" / CHECKPOINT_NAME)["step"] == 50


# --- 2. --stop-at at or below the checkpoint's step ---------------------------------------------------

@pytest.mark.parametrize("stop_at", [10, 20])
def test_stop_at_not_after_the_checkpoint_step_is_refused(stopped, tmp_path, stop_at):
    path = place(stopped, tmp_path / "runs" / CHECKPOINT_NAME)
    code, stdout, stderr = run_main(["--resume", path, "--stop-at", stop_at])
    assert code == 2
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: --stop-at ({stop_at})") and str(path) in line and "(20)" in line
    assert snapshot(tmp_path / "runs") == {CHECKPOINT_NAME: stopped} and stdout == ""


# --- 3. one run at a time on a folder or a log ----------------------------------------------------------

def test_a_second_run_on_a_locked_folder_or_log_is_refused(tmp_path):
    out, log = tmp_path / "runs", tmp_path / "log.jsonl"
    out.mkdir()
    with lock.Lock.on_folder(str(out)):
        code, stdout, stderr = run_main([*FLAGS, "--out", out])
    assert code == 1 and stdout == ""
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: folder {out} is in use by another training run, "
                           f"process {os.getpid()} on {socket.gethostname()}")
    assert os.listdir(out) == []  # nothing written, and the lock went with its holder
    with lock.Lock.on_file(str(log)):
        code, _, stderr = run_main([*FLAGS, "--out", out, "--log", log])
    assert code == 1 and f"--log {log} is in use by another training run, process {os.getpid()}" in error_line(stderr)
    assert os.listdir(out) == [] and not log.exists()
    assert run_main([*FLAGS, "--steps", "10", "--warmup", "5", "--out", out, "--log", log])[0] == 0  # both free again
    assert sorted(os.listdir(out)) == [CHECKPOINT_NAME] and sorted(os.listdir(tmp_path)) == ["log.jsonl", "runs"]


@pytest.mark.parametrize("how", ["finished", "stop-at", "diverged", "bad-log"])
def test_the_locks_are_released_on_every_exit(tmp_path, how):
    out, log = tmp_path / "runs", tmp_path / "logs" / "log.jsonl"
    extra = {"finished": ["--steps", "10", "--warmup", "5"], "stop-at": ["--stop-at", "10"], "diverged": ["--lr", "1e30", "--warmup", "0"],
             "bad-log": []}[how]
    if how == "bad-log":
        log.mkdir(parents=True)  # a folder where the log file should be
    with np.errstate(all="ignore"):
        code, _, _ = run_main([*FLAGS, *extra, "--out", out, "--log", log])
    assert code == (0 if how in ("finished", "stop-at") else 1)
    assert LOCK not in os.listdir(out) and not list(log.parent.glob(".*.lock"))


@pytest.mark.parametrize("flock", [True, False])
def test_a_lock_that_cannot_be_written_leaves_no_lock_file(tmp_path, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(lock, "fcntl", None)

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lock.os, "write", disk_full)
    with pytest.raises(OSError, match=f"cannot write the lock of folder {tmp_path} .*: No space left on device"):
        lock.Lock.on_folder(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("holder", ["dead", "alive", "other-host"])
def test_without_flock_the_lock_file_names_its_pid_and_a_dead_one_is_taken_over(tmp_path, monkeypatch, holder):
    monkeypatch.setattr(lock, "fcntl", None)  # the O_EXCL lock of systems without fcntl
    out = tmp_path / "runs"
    out.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    pid, host = {"dead": (ended.pid, socket.gethostname()), "alive": (os.getpid(), socket.gethostname()),
                 "other-host": (os.getpid(), "elsewhere")}[holder]
    (out / LOCK).write_text(f"{pid} {host}\n")
    code, _, stderr = run_main([*FLAGS, "--steps", "10", "--warmup", "5", "--out", out])
    if holder == "dead":
        assert code == 0, stderr
        assert os.listdir(out) == [CHECKPOINT_NAME]
    else:
        assert code == 1
        line = error_line(stderr)
        assert f"folder {out} is in use by another training run, process {pid} on {host}" in line
        assert (f"delete {out / LOCK}" in line) == (holder == "other-host")
        assert (out / LOCK).read_text() == f"{pid} {host}\n"


def test_a_run_killed_hard_leaves_a_lock_and_temporaries_the_next_one_takes_over_and_removes(tmp_path):
    out = tmp_path / "runs"
    process = start_train(out)
    process.kill()  # kill -9: no handler runs
    process.communicate()
    assert (out / LOCK).exists()
    (out / ".checkpoint-k1ll3d.npz.tmp").write_bytes(b"half a checkpoint")  # what kill -9 during a save leaves
    step = checkpoint.load(out / CHECKPOINT_NAME)["step"]
    code, stdout, stderr = run_main(["--resume", out / CHECKPOINT_NAME, "--steps", step + 5, "--eval-every", "5"])
    assert code == 0, stderr
    assert f"removed {out / '.checkpoint-k1ll3d.npz.tmp'}" in stdout
    assert os.listdir(out) == [CHECKPOINT_NAME]
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == step + 5


# --- 4. SIGTERM and SIGHUP are Ctrl-C -----------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_save_say_how_to_resume_and_exit_128_plus_the_signal(tmp_path, name, code):
    out, log = tmp_path / "runs", tmp_path / "log.jsonl"
    process = start_train(out, "--log", log)
    try:
        # while it runs, a second run on its folder, or on its log, is refused, naming it
        for argv, what in (([*FLAGS, "--out", out], f"folder {out}"), ([*FLAGS, "--out", tmp_path / "b", "--log", log], f"--log {log}")):
            second, _, stderr = run_main(argv)
            assert second == 1
            assert f"{what} is in use by another training run, process {process.pid} on " in error_line(stderr)
        process.send_signal(getattr(signal, name))
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    path = out / CHECKPOINT_NAME
    interrupted = int(re.search(rf"interrupted at step (\d+) by {name}; saved {re.escape(str(path))}\. "
                                rf"Resume with: python train.py --resume {re.escape(str(path))}", stderr).group(1))
    assert checkpoint.load(path)["step"] == interrupted >= 10
    assert os.listdir(out) == [CHECKPOINT_NAME]  # no lock, no temporary file
    assert read_log(log)[-1]["step"] <= interrupted


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_under_nohup_sighup_stays_ignored(tmp_path):
    out = tmp_path / "runs"
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does; the child inherits it
    try:
        process = start_train(out)
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None  # still training
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143 and "by SIGTERM" in stderr


# --- 4b. the worker processes of a step ------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc"), reason="worker processes are forked")
IN_PROCESSES = ["--threads", "2", "--parallel", "processes"]


def children_of(pid):
    """The ids of the processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = stat_fields(entry)
        if fields is not None and int(fields[1]) == pid:  # None: it ended meanwhile
            found.append(int(entry))
    return found


@needs_fork
def test_ctrl_c_to_the_whole_group_saves_once_and_leaves_no_worker(tmp_path):
    out = tmp_path / "runs"
    process = start_train(out, *IN_PROCESSES, new_session=True)
    try:
        workers = children_of(process.pid)
        assert len(workers) == 1
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the run and its worker both get it
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = int(re.search(r"interrupted at step (\d+); saved", stderr).group(1))
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == step >= 10
    assert os.listdir(out) == [CHECKPOINT_NAME]
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


@needs_fork
def test_a_worker_killed_mid_run_saves_the_last_step_and_the_resumed_run_ends_as_an_unbroken_one(tmp_path, monkeypatch):
    flags = [*FLAGS, "--dropout", "0.1", *IN_PROCESSES]
    assert run_main([*flags, "--out", tmp_path / "unbroken"])[0] == 0
    step_of = training.Run.train_step
    killed = []

    def killing_at_step_15(run, **kwargs):
        if run.step == 15 and not killed:
            (pid,) = run.sharded.worker_pids
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return step_of(run, **kwargs)

    monkeypatch.setattr(training.Run, "train_step", killing_at_step_15)
    path = tmp_path / "broken" / CHECKPOINT_NAME
    code, _, stderr = run_main([*flags, "--out", path.parent])
    assert code == 1
    assert error_after_bar(stderr) == (f"error: the worker process of shard 2 (pid {killed[0]}) was killed by signal 9 (SIGKILL) "
                                       f"during a step; saved step 15 in {path}. Resume with: python train.py --resume {path}")
    assert checkpoint.load(path)["step"] == 15
    monkeypatch.setattr(training.Run, "train_step", step_of)
    assert run_main(["--resume", path])[0] == 0
    assert_same_state(checkpoint.load(path), checkpoint.load(tmp_path / "unbroken" / CHECKPOINT_NAME))


# --- 5. a failing --log write ---------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_log_saves_the_checkpoint_first_and_names_the_log(tmp_path):
    out = tmp_path / "runs"
    code, _, stderr = run_main([*FLAGS, "--out", out, "--log", "/dev/full"])
    assert code == 1
    line = error_after_bar(stderr)
    assert line.startswith("train.py: error: cannot write --log /dev/full: No space left on device; ")
    assert f"step 10 is saved in {out / CHECKPOINT_NAME}" in line
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == 10
    assert os.listdir(out) == [CHECKPOINT_NAME]


def test_a_log_write_failing_mid_run_saves_that_step_first(tmp_path, monkeypatch):
    real_open_log = training.open_log

    class FailingLog:
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, text):
            self.writes += 1
            if self.writes == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(training, "open_log", lambda path, append: FailingLog(real_open_log(path, append)))
    out, log = tmp_path / "runs", tmp_path / "log.jsonl"
    code, _, stderr = run_main([*FLAGS, "--out", out, "--log", log])
    assert code == 1
    assert error_after_bar(stderr).startswith(f"train.py: error: cannot write --log {log}: No space left on device; "
                                         f"step 20 is saved in {out / CHECKPOINT_NAME}")
    assert checkpoint.load(out / CHECKPOINT_NAME)["step"] == 20
    assert [entry["step"] for entry in read_log(log)] == [10]


# --- 6. a checkpoint that holds no run ----------------------------------------------------------------

EMPTY_STATES = {
    "null": lambda state: None,
    "empty": lambda state: {},
    "no-config": lambda state: {key: value for key, value in state.items() if key != "config"},
    "null-config": lambda state: dict(state, config=None),
    "no-model": lambda state: {key: value for key, value in state.items() if key != "model"},
}


@pytest.mark.parametrize("how", ["--resume", "--evaluate"])
@pytest.mark.parametrize("kind", sorted(EMPTY_STATES))
def test_a_checkpoint_without_a_run_is_refused_naming_it(stopped, tmp_path, kind, how):
    real = place(stopped, tmp_path / "real.npz")
    bad = tmp_path / "mine" / "bad.npz"
    bad.parent.mkdir()
    checkpoint.save(bad, EMPTY_STATES[kind](checkpoint.load(real)))
    place(stopped, tmp_path / "mine" / CHECKPOINT_NAME)  # the user's own run, beside it
    before = snapshot(bad.parent)
    argv = ["--resume", bad] if how == "--resume" else ["--checkpoint", bad, "--evaluate"]
    code, stdout, stderr = run_main(argv)
    assert code == 1
    line = error_line(stderr)
    assert line.startswith(f"train.py: error: checkpoint {bad}: ") and "training run" in line
    assert snapshot(bad.parent) == before and stdout == ""
