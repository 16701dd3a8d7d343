"""Helpers shared by the benchmark scripts: paths, tables, README blocks."""

import json
import os
import platform
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def hardware() -> dict:
    """The machine and library versions, for the result files."""
    import keras
    import numpy as np
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")


def md_table(header: list, rows: list) -> str:
    """A Markdown table from a header and rows of cells."""
    lines = [
        "| " + " | ".join(str(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme_block(name: str, text: str, readme: str = README) -> bool:
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->`.

    The README's result tables are written by the scripts, never typed.
    Headings go one level down, under the README's own section heading.
    Returns whether the block was found.
    """
    text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not os.path.isfile(readme):
        return False
    with open(readme) as f:
        content = f.read()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True
