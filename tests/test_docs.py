"""Every code block of README.md and docs/*.md runs, and shows what the code prints.

One test per block, named by file and line (test_doc_block[docs/autodiff.md:36]).
The rules, by the block's language (every block names one):

- python: run on its own in a fresh interpreter from the repository root. Its output
  is checked one of two ways:
  * a block followed by a paragraph whose first word is `prints`, then a text block:
    the block's whole output must be that text block;
  * otherwise, a print whose line ends in a comment must print that comment's text
    (`print(x.dtype)   # float32`), and a print line without a comment that is
    followed directly by whole-line comments must print those lines, for output of
    several lines. A print line with neither is just run.
- python whose first line is `# excerpt from PATH` (anything may follow PATH): PATH is a
  file of the repository, and the block's other lines are in it verbatim, in order and
  contiguous, up to one indentation common to all of them. A first line that is a
  comment naming a .py file must be such an excerpt marker.
- console: `$ command` lines, each followed by what it prints (stdout and stderr as a
  terminal shows them: each line's text after its last carriage return). A command
  runs python: this interpreter, with a script path taken from the repository root,
  in a folder shared by the test session where README's main command (the block
  marked `<!-- main-command -->`) has run first; identical commands run once. A file
  a command writes that has the name of a file beside the Markdown file (`--svg
  reverse-attention.svg` in docs/training.md) must equal that file byte for byte.
- bash: commands to type, not run; every `*.py` word names a file of the repository.
- text: not checked, except as the output of a python block (above).

A block after `<!-- only with a GPU -->` or `<!-- only without CuPy -->` shows what
happens only on such a machine, and is skipped elsewhere with the reason.

Outputs are compared line by line, trailing spaces and blank lines ignored; an expected
line `...` stands for any number of lines. What changes from run to run by itself
(durations, tqdm's clock and rates, tokens per second, object ids: doc_blocks.VOLATILE)
is masked on both sides, and nothing else is. A console block after `<!-- recorded with
OpenBLAS's Haswell kernels -->` is compared so only where NumPy's OpenBLAS runs those
kernels; elsewhere float32 products round differently, training takes another path, and
the block is compared loosely (doc_blocks.loosely), without the files it writes.
"""
import concurrent.futures
import importlib.util
import multiprocessing
import os
import re
from pathlib import Path

import pytest

import doc_blocks
import tinyattn
from tinyattn import cpu

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md"))]
BLOCKS = [block for path in DOCS for block in doc_blocks.read_blocks(ROOT, path)]
CHECKED = [block for block in BLOCKS if block.language != "text"]
KNOWN_LANGUAGES = {"python", "console", "bash", "text"}
PYTHON_TIMEOUT_S = 120
COMMAND_TIMEOUT_S = 300
# A block that can show its output only on some machines says which in a comment before it.
CONDITIONS = {
    "only with a GPU": (tinyattn.cuda_available, "needs a GPU (CuPy and a CUDA device)"),
    "only without CuPy": (lambda: importlib.util.find_spec("cupy") is None,
                          "shows what a machine without CuPy prints, and CuPy is installed here"),
}
# A mention of these means a citation of notes that live outside the repository.
OUTSIDE_NOTES = ("PERF-NOTES", "../" + "shared/")  # split, so this file does not cite them itself


@pytest.fixture(scope="session")
def fresh_interpreters():
    """Runs each python block in its own fresh process, forked from a server that has imported tinyattn once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tinyattn", "doc_blocks"])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        yield lambda source: pool.submit(doc_blocks.run_python, source, ROOT).result(timeout=PYTHON_TIMEOUT_S)


class CommandFolder:
    """The folder where console commands run, each command once per session."""

    def __init__(self, folder):
        self.folder, self.runs = folder, {}

    def run(self, command):
        argv, environment = doc_blocks.command_argv(command, ROOT)
        key = (tuple(argv), tuple(sorted(environment.items())))
        if key not in self.runs:
            self.runs[key] = doc_blocks.run_command(command, ROOT, self.folder, COMMAND_TIMEOUT_S)
        return self.runs[key]


@pytest.fixture(scope="session")
def command_folder(tmp_path_factory):
    folder = CommandFolder(tmp_path_factory.mktemp("doc-commands"))
    folder.run(doc_blocks.main_command(ROOT, BLOCKS))
    return folder


def mismatch(what, expected, actual, loose=False):
    """What the doc says beside what the code printed, or None when they match."""
    expected = doc_blocks.output_lines(expected if isinstance(expected, str) else "\n".join(expected))
    actual = doc_blocks.output_lines(actual)
    return None if doc_blocks.matches(expected, actual, loose) else doc_blocks.difference(what, expected, actual)


def fail_on(mismatches):
    mismatches = [text for text in mismatches if text is not None]
    if mismatches:
        pytest.fail("\n".join(mismatches), pytrace=False)


def check_python(block, run):
    excerpt_of = doc_blocks.excerpt_source(block)
    if excerpt_of is not None:
        return check_excerpt(block, excerpt_of)
    if doc_blocks.names_a_source_file(block):
        pytest.fail(f"{block.id}: a block that quotes a source file starts with `# excerpt from PATH`", pytrace=False)
    result = run(block.text)
    if result["error"] is not None:
        pytest.fail(f"{block.id} raised:\n{result['error']}", pytrace=False)
    if block.output is not None:  # its comments are then remarks, not outputs
        fail_on([mismatch(f"{block.id}: what the block prints", block.output, result["stdout"])])
    else:
        fail_on(mismatch(f"{block.path}:{block.line + line}: the print on this line", expected, result["printed"].get(line, ""))
                for line, expected in doc_blocks.expected_prints(block.text).items())


def check_excerpt(block, path):
    source = ROOT / path
    if not source.is_file():
        pytest.fail(f"{block.id}: an excerpt of {path}, which is not a file of the repository", pytrace=False)
    excerpt, source_lines = block.text.splitlines()[1:], source.read_text().splitlines()
    if not doc_blocks.excerpt_found(excerpt, source_lines):
        present = {line.strip() for line in source_lines}
        nowhere = [f"{block.path}:{block.line + number}: {line.strip()}" for number, line in enumerate(excerpt, 2)
                   if line.strip() not in present]
        pytest.fail(f"{block.id}: these lines are not in {path} (verbatim, in order, contiguous):\n"
                    + "\n".join("    " + line for line in excerpt)
                    + "".join(f"\n  not in {path} at all: {line}" for line in nowhere), pytrace=False)


def check_console(block, folder):
    recorded, here = doc_blocks.recorded_kernels(block.marker), cpu.blas_kernels()
    loose = recorded is not None and recorded != here
    for command, expected in doc_blocks.transcript(block.text):
        output, written = folder.run(command)
        what = f"{block.id}: $ {command}" + (f" (compared loosely: recorded with OpenBLAS's {recorded} kernels, "
                                               f"run here on {here or 'another BLAS'})" if loose else "")
        fail_on([mismatch(what, expected, output, loose)])
        if loose:  # the files it writes come from another run too
            continue
        beside = (ROOT / block.path).parent
        for path, content in written.items():
            if (beside / path).is_file() and (beside / path).read_bytes() != content:
                pytest.fail(f"{block.id}: `{command}` writes {path}, which differs from "
                            f"{(beside / path).relative_to(ROOT)}", pytrace=False)


def check_bash(block):
    missing = [word for word in doc_blocks.python_files_named(block.text) if not (ROOT / word).is_file()]
    if missing:
        pytest.fail(f"{block.id}: no such file in the repository: {', '.join(missing)}", pytrace=False)


@pytest.mark.parametrize("block", CHECKED, ids=[block.id for block in CHECKED])
def test_doc_block(block, request):
    if block.language not in KNOWN_LANGUAGES:
        pytest.fail(f"{block.id}: a block names its language, one of {', '.join(sorted(KNOWN_LANGUAGES))}; "
                    f"got {block.language!r}", pytrace=False)
    if block.marker in CONDITIONS:
        holds, reason = CONDITIONS[block.marker]
        if not holds():
            pytest.skip(f"{block.id} {reason}")
    if block.language == "python":
        check_python(block, request.getfixturevalue("fresh_interpreters"))
    elif block.language == "console":
        check_console(block, request.getfixturevalue("command_folder"))
    elif block.language == "bash":
        check_bash(block)


def repository_files(suffixes):
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        yield from (Path(folder) / name for name in files if name.endswith(suffixes))


def test_no_file_cites_notes_outside_the_repository():
    """Docs and docstrings cite only files a reader of the repository has."""
    pattern = re.compile("|".join(re.escape(text) for text in OUTSIDE_NOTES))
    this_test = Path(__file__).resolve()
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in repository_files((".md", ".py")) if path.resolve() != this_test  # it names what it looks for
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    if found:
        pytest.fail("cites notes outside the repository:\n" + "\n".join(found), pytrace=False)


def test_a_loose_comparison_forgives_another_path_but_not_another_format():
    recorded = ["step   100  loss 1.5762  held-out exact-match 0.039  3.9s",
                "step   200  loss 0.7847  held-out exact-match 0.207  8.6s",
                " 13%|█▎        | 200/1500 [00:08<00:50, 20.7step/s]",
                "6 2 9 -> ▓▒ ░█"]
    another_path = ["step   100  loss 1.5762  held-out exact-match 0.037  2.9s",
                    "step   200  loss 0.8264  held-out exact-match 0.281  6.6s",
                    "step   300  loss 0.4602  held-out exact-match 0.457  10.0s",
                    " 20%|██        | 300/1500 [00:10<00:40, 29.8step/s]",
                    "6 2 9 -> █░ ▒▓"]
    another_format = [line.replace("held-out", "test") for line in another_path]
    assert not doc_blocks.matches(recorded, another_path)
    assert doc_blocks.matches(recorded, another_path, loose=True)
    assert not doc_blocks.matches(recorded, another_format, loose=True)
    assert doc_blocks.recorded_kernels("recorded with OpenBLAS's Haswell kernels") == "Haswell"
    assert doc_blocks.recorded_kernels("a note") is None
