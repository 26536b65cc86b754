"""Code blocks of Markdown documents (README.md, model cards), and a runner that executes Python blocks as written.

A block may be preceded by an HTML comment that tells the documentation tests what to do with it (invisible when the
Markdown is rendered):

    <!-- readme-test: skip: why this block cannot run in the test suite -->
    <!-- readme-test: file: recipe.yaml -->    (the block is that file, which the following commands read)

Python snippets name the inputs a reader brings in comment lines such as `# image: a PIL image`; the runner gives each
such name a small value of that kind (by the words of its description) and runs the block in a fresh namespace, so
that every block must stand on its own as a reader copies it.
"""

import re
from dataclasses import dataclass


_FENCE = re.compile(r"^(?P<fence>`{3,})(?P<language>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<verb>skip|file):\s*(?P<argument>.*?)\s*-->$", re.S)
# Comment lines that declare an input of a snippet: `# name: description`.
DECLARATION = re.compile(r"^# (?P<name>[A-Za-z_]\w*): (?P<description>.+)$", re.M)


@dataclass
class Block:
    language: str
    code: str
    line: int  # line of the opening fence (1-based)
    skip: str | None = None  # why the block is not run
    file: str | None = None  # the file the block is

    @property
    def label(self) -> str:
        return f"line {self.line} ({self.language})"


def code_blocks(text: str) -> list[Block]:
    """Every fenced block that has a language (blocks without one show output, not code), with its directive."""
    blocks = []
    for match in _FENCE.finditer(text):
        if not match.group("language"):
            continue
        block = Block(match.group("language"), match.group("code"), text.count("\n", 0, match.start()) + 1)
        before = text[: match.start()].rstrip()
        if before.endswith("-->"):  # the HTML comment right above the fence
            directive = _DIRECTIVE.match(before[before.rfind("<!--") :])
            if directive is not None:
                setattr(block, directive.group("verb"), " ".join(directive.group("argument").split()))
        blocks.append(block)
    return blocks


# Runs in the fresh process: each file named on the command line is a snippet, executed in a namespace of its own
# that holds a value for every input it declares. Prints one line per snippet that ran.
RUNNER = r"""
import re, sys
import numpy as np
from PIL import Image

DECLARATION = re.compile(__DECLARATION__, re.M)
rng = np.random.default_rng(0)
# The first description words that match decide (a video is "an array (frames, ...) or a list of PIL images").
MAKERS = {
    "frames": lambda: rng.integers(0, 255, (4, 36, 36, 3), dtype=np.uint8),
    "num_points": lambda: rng.standard_normal((200, 6)).astype(np.float32),
    "waveform": lambda: (rng.standard_normal(16000) * 0.1).astype(np.float32),
    "PIL image": lambda: Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
}

for path in sys.argv[1:]:
    code = open(path).read()
    namespace = {"__name__": "__main__"}
    for name, description in DECLARATION.findall(code):
        makers = [make for words, make in MAKERS.items() if words in description]
        if not makers:
            raise SystemExit(f"{path}: cannot tell what input {name!r} is from {description!r}")
        namespace[name] = makers[0]()
    exec(compile(code, path, "exec"), namespace)
    print(f"ran {path}", flush=True)
""".replace("__DECLARATION__", repr(DECLARATION.pattern))
