"""The fenced code blocks of Markdown files, and what it takes to check one (the rules are in test_docs.py).

Kept apart from the test module so that a fresh interpreter can import it to run a
Python block without importing pytest.
"""
import ast
import collections
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tokenize
import traceback
from pathlib import Path

FENCE = re.compile(r"^( *)```(\S*)\s*$")
EXCERPT = re.compile(r"#\s*excerpt from ([^\s:(),]+)")
NAMES_A_SOURCE_FILE = re.compile(r"^#.*\b[\w/]+\.py\b")
PRINTS = "prints"
ANY_LINES = "..."
# The one thing masked before outputs are compared: what changes from run to run by itself.
VOLATILE = re.compile(r"""
      [\d.]+(?:step/s|s/step)        # tqdm's rate
    | [\d.]+k\ tok/s                 # train.py's tokens per second
    | \d+:\d\d\b                     # tqdm's elapsed and remaining time
    | \d+(?:\.\d+)?\ ?s\b            # a duration in seconds: 3.9s, 33.8 s
    | \b[a-z]\d{9,}\b                # an object's id, as to_dot names its nodes
""", re.VERBOSE)
PLACEHOLDER = "<volatile>"
# A transcript of training depends on how float32 products round, which depends on the
# BLAS kernels: `<!-- recorded with OpenBLAS's Haswell kernels -->` before a block says
# which ones it was recorded with. Elsewhere the run takes another path, and the block is
# compared loosely: every number and every shaded cell of an attention map masked, and a
# run of lines that are then alike counted as one (so 7 evaluation lines match 8), and
# tqdm's bar, whose length follows the step it stopped at, masked.
RECORDED_WITH = re.compile(r"^recorded with OpenBLAS's (\w+) kernels$")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e[-+]?\d+)?")
SHADED_ROW = re.compile(r"[ ░▒▓█]*[░▒▓█][ ░▒▓█]*$")
PROGRESS_BAR = re.compile(r"\|[ ▏▎▍▌▋▊▉█]*\|")
PYTHON_PROGRAMS = re.compile(r"^(?:.*/)?python3?$")
BLOCK_FILENAME = "<doc block>"
PRINTER = "__print_recorded_at__"


@dataclasses.dataclass
class Block:
    path: str            # of the Markdown file, relative to the repository root
    line: int            # of the opening fence, counting from 1
    language: str
    text: str            # the block's lines without their fence indentation
    marker: str = ""     # an HTML comment on the line before the fence, such as "main-command"
    output: str = None   # for a python block: the text block after its "prints" paragraph

    @property
    def id(self):
        return f"{self.path}:{self.line}"


def read_blocks(root, path):
    """The fenced blocks of one Markdown file, each text block after `prints` attached to its python block."""
    lines = (Path(root) / path).read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.groups()
        end = index + 1
        while end < len(lines) and not (FENCE.match(lines[end]) and FENCE.match(lines[end]).group(2) == ""):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: the block is never closed")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[index + 1:end]]
        before = lines[index - 1].strip() if index else ""
        marker = before[4:-3].strip() if before.startswith("<!--") and before.endswith("-->") else ""
        blocks.append(Block(path, index + 1, language, "\n".join(body) + "\n", marker))
        index = end + 1
    return _attach_outputs(blocks, lines)


def _attach_outputs(blocks, lines):
    kept = []
    for previous, block in zip([None, *blocks], blocks):
        if (block.language == "text" and previous is not None and previous.language == "python"
                and _words_between(lines, previous, block)[:1] == [PRINTS]):
            previous.output = block.text
        else:
            kept.append(block)
    return kept


def _words_between(lines, first, second):
    first_end = first.line + first.text.count("\n")  # the 0-based index of first's closing fence
    return " ".join(lines[first_end + 1:second.line - 1]).split()


# --- comparing outputs ------------------------------------------------------------------------

def masked(text):
    return VOLATILE.sub(PLACEHOLDER, text)


def output_lines(text):
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def recorded_kernels(marker):
    """The OpenBLAS kernels a block's marker says it was recorded with, or None."""
    found = RECORDED_WITH.match(marker)
    return found and found.group(1)


def loosely(lines):
    """Lines with numbers and attention-map shading masked, runs of equal lines counted once."""
    kept = []
    for line in lines:
        if line != ANY_LINES:
            line = NUMBER.sub("#", masked(line))
            line = SHADED_ROW.sub("<shades>", PROGRESS_BAR.sub("|<bar>|", line))
        if not kept or kept[-1] != line:
            kept.append(line)
    return kept


def matches(expected, actual, loose=False):
    """Whether actual lines equal expected ones, where an expected `...` line stands for any
    number of lines; with loose, as compared by loosely()."""
    if loose:
        return matches(loosely(expected), loosely(actual))
    expected, actual = [masked(line) for line in expected], [masked(line) for line in actual]
    if ANY_LINES not in expected:
        return expected == actual
    cut = expected.index(ANY_LINES)
    head, rest = expected[:cut], expected[cut + 1:]
    if actual[:len(head)] != head:
        return False
    return any(matches(rest, actual[start:]) for start in range(len(head), len(actual) + 1))


def difference(what, expected, actual):
    """A message that shows what the doc says next to what the code printed."""
    def indented(lines):
        return "\n".join("    " + line for line in lines) or "    (nothing)"
    return f"{what}\n  the doc says:\n{indented(expected)}\n  the code printed:\n{indented(actual)}"


# --- python blocks ------------------------------------------------------------------------------

def excerpt_source(block):
    """The file a python block says it is an excerpt of, or None for a block to run."""
    first_line = block.text.splitlines()[0]
    found = EXCERPT.match(first_line)
    return found.group(1) if found else None


def names_a_source_file(block):
    return bool(NAMES_A_SOURCE_FILE.match(block.text.splitlines()[0]))


def excerpt_found(excerpt_lines, source_lines):
    """Whether the excerpt's lines are in the source verbatim, in order and contiguous, up to one common indentation."""
    wanted = textwrap.dedent("\n".join(excerpt_lines)).splitlines()
    for start in range(len(source_lines) - len(wanted) + 1):
        window = source_lines[start:start + len(wanted)]
        if [line.rstrip() for line in textwrap.dedent("\n".join(window)).splitlines()] == wanted:
            return True
    return False


def expected_prints(source):
    """{last line of a print call: the lines the doc says it prints}, from the output comments."""
    tree = ast.parse(source)
    print_lines = sorted({node.end_lineno for node in ast.walk(tree) if _is_print(node)})
    inline, whole_line = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            text = token.string[1:]
            if token.line[:column].strip():
                inline[row] = text.strip()
            else:
                whole_line[row] = (text[1:] if text.startswith(" ") else text).rstrip()
    expected = {}
    for line in print_lines:
        if line in inline:
            expected[line] = [inline[line]]
        elif line + 1 in whole_line:
            following = line + 1
            while following in whole_line:
                following += 1
            expected[line] = [whole_line[row] for row in range(line + 1, following)]
    return expected


def _is_print(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


class _RecordPrints(ast.NodeTransformer):
    """print(...) becomes __print_recorded_at__(its last line)(...), so each print's output is known by line."""

    def visit_Call(self, node):
        self.generic_visit(node)
        if not _is_print(node):
            return node
        printer = ast.Call(ast.Name(PRINTER, ast.Load()), [ast.Constant(node.end_lineno)], [])
        return ast.copy_location(ast.Call(printer, node.args, node.keywords), node)


def run_python(source, root):
    """Run a block as a script from the repository root; meant for a fresh process.

    Returns its whole standard output, what each print line printed ({last line: text}),
    and the traceback if it raised.
    """
    os.chdir(root)
    code = compile(ast.fix_missing_locations(_RecordPrints().visit(ast.parse(source))), BLOCK_FILENAME, "exec")
    stdout, by_line = io.StringIO(), collections.defaultdict(io.StringIO)

    def printer_at(line):
        def print_and_record(*values, **options):
            if options.get("file") is not None:
                return print(*values, **options)
            text = io.StringIO()
            print(*values, **options, file=text)
            stdout.write(text.getvalue())
            by_line[line].write(text.getvalue())
        return print_and_record

    error = None
    with contextlib.redirect_stdout(stdout):
        try:
            exec(code, {"__name__": "__main__", PRINTER: printer_at})
        except BaseException:  # the block's own failure, SystemExit included, is what the test reports
            error = traceback.format_exc()
    return {"stdout": stdout.getvalue(), "printed": {line: text.getvalue() for line, text in by_line.items()},
            "error": error}


# --- shell blocks -------------------------------------------------------------------------------

def transcript(text):
    """[(command, expected output lines)] of a console block's `$ command` lines."""
    steps = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"a console block starts with a `$ command` line, not {line!r}")
    return steps


def python_files_named(text):
    """Every word ending in .py in shell commands (comments left out)."""
    words = []
    for line in text.replace("\\\n", " ").splitlines():
        words += [word for word in shlex.split(line, comments=True) if word.endswith(".py")]
    return words


def command_argv(command, root):
    """(argv, environment additions) for a doc's python command: this interpreter, the repository's script."""
    words = shlex.split(command)
    environment = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        environment[name] = value
    if not words or not PYTHON_PROGRAMS.match(words[0]):
        raise ValueError(f"a console command runs python, not {command!r}")
    arguments = words[1:]
    if arguments and not arguments[0].startswith("-"):
        arguments[0] = str(Path(root) / arguments[0])
    return [sys.executable, *arguments], environment


def terminal_text(raw):
    """What a terminal shows for this output: each line's text after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in raw.split("\n"))


def run_command(command, root, folder, timeout):
    """Run a doc's command in `folder`; (output as a terminal shows it, {path: bytes} of the files it wrote)."""
    argv, environment = command_argv(command, root)
    before = _file_times(folder)
    # Unbuffered, stdout and stderr reach the one pipe in the order they were written, as on a terminal.
    env = {**os.environ, **environment, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout)
    written = {path: (Path(folder) / path).read_bytes() for path, time in _file_times(folder).items()
               if before.get(path) != time}
    return terminal_text(result.stdout.decode()), written


def _file_times(folder):
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in Path(folder).rglob("*") if path.is_file()}


def main_command(root, blocks):
    """The python command of the block marked <!-- main-command --> (README's main job)."""
    (block,) = [block for block in blocks if block.marker == "main-command"]
    commands = [part.strip() for part in block.text.replace("\n", " ").split("&&")]
    return [command for command in commands if PYTHON_PROGRAMS.match(shlex.split(command)[0])][-1]
