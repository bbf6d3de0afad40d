"""Replaces the generated block of a Markdown document: the text between its
"<!-- results:begin -->" and "<!-- results:end -->" lines (used by the
render_*_results.py scripts)."""
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def replace_results_block(path, text):
    """Writes `text` between the markers of `path`; exits naming the file when they are missing."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)
