"""`train.py --watch FILE.svg`: attention forming during training, one frame per evaluation.

At every evaluation the model decodes one fixed held-out sequence (the longest of the
first held-out batch) and its attention on the source, each layer's heads averaged, is
added to a filmstrip labelled with the step and the held-out exact-match. The SVG is
rewritten whole each time, through a temporary file renamed over it, so it can be opened
mid-run; beside it FILE.html shows one frame at a time with a step slider (an inline
script, nothing from the network). The frames also ride in the SVG's <metadata>, so a
resumed run goes on with the filmstrip it left (frames after the resumed step dropped);
a fresh run starts a new one, as it starts a new --log.
"""
import json
import os
import re
from xml.sax.saxutils import escape, unescape

from tinyattn.tasks import describe
from tinyattn.viz import filmstrip_svg

from .evaluation import ATTENTION_KINDS, attention_of

METADATA = re.compile(r"<metadata>(.*?)</metadata>", re.DOTALL)


class Filmstrip:
    """The frames of one run's --watch file, written after each one is added."""

    def __init__(self, path, run, eval_batches, resumed=False):
        self.path, self.run = path, run
        self.source = max(eval_batches[0].sources[:64], key=len)
        self.title = f"{ATTENTION_KINDS[run.config.model]} of one held-out sequence as training goes ({run.config.task})"
        self.frames = [frame for frame in _saved_frames(path) if frame["step"] <= run.step] if resumed else []

    def add(self, step, exact_match):
        predicted, maps = attention_of(self.run, self.source)
        self.frames.append({"step": step, "exact_match": exact_match,
                            "caption": f"step {step}, exact-match {exact_match:.0%}",
                            "rows": [describe([token]) for token in predicted],
                            "maps": [[[round(float(w), 4) for w in row] for row in layer.mean(axis=0)] for layer in maps]})
        self.write()

    def write(self):
        columns = [describe([token]) for token in self.source]
        svg = filmstrip_svg(self.frames, columns, self.title)
        metadata = f"<metadata>{escape(json.dumps(self.frames))}</metadata>\n"
        _replace(self.path, svg.replace("</svg>\n", metadata + "</svg>\n"))
        _replace(os.path.splitext(self.path)[0] + ".html", _slider_page(self.frames, columns, self.title))


def _saved_frames(path):
    """The frames a --watch file holds, or none when it is missing or not one of ours."""
    try:
        with open(path, encoding="utf-8") as file:
            found = METADATA.search(file.read())
        frames = json.loads(unescape(found.group(1))) if found else []
    except (OSError, ValueError):
        return []
    return frames if isinstance(frames, list) and all(isinstance(f, dict) and "step" in f for f in frames) else []


def _replace(path, text):
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader
    sees the old file or the new one, never half of one."""
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _slider_page(frames, columns, title):
    """A self-contained HTML page: one frame's SVG at a time, a slider to pick the step."""
    pictures = [filmstrip_svg([frame], columns, title) for frame in frames]
    data = json.dumps({"pictures": pictures, "captions": [frame["caption"] for frame in frames]}).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body {{ background: #ffffff; color: #222222; font-family: Helvetica, sans-serif; margin: 2em; }}</style>
</head><body>
<h2>{escape(title)}</h2>
<p><input type="range" id="frame" min="0" max="{len(frames) - 1}" value="{len(frames) - 1}" style="width: 30em">
<span id="caption"></span></p>
<div id="picture"></div>
<script>
const film = {data};
function show(index) {{
  document.getElementById("picture").innerHTML = film.pictures[index];
  document.getElementById("caption").textContent = film.captions[index];
}}
document.getElementById("frame").addEventListener("input", event => show(Number(event.target.value)));
show(film.pictures.length - 1);
</script>
</body></html>
"""
