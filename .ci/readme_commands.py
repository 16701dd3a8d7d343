"""Runs the README's command blocks top to bottom, as a new user would.

Every fenced block that follows a line `<!-- ci: run -->` in README.md is
run in one fresh empty folder, blocks in order, each line a shell command
(comments after `#` are kept: the shell ignores them). `pip install` lines
are left out: they install this checkout, which `.ci/run` has just done in
its fresh environment. A command that fails stops the run with its exit
code. Prints each command's wall time, and the
total, so that the README's times come from here.

    python .ci/readme_commands.py            # in a new temporary folder
    python .ci/readme_commands.py --list     # only print the commands
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- ci: run -->"
README = os.path.join(ROOT, "README.md")


def readme_commands(path=README) -> list:
    """The commands of the marked blocks, in order (continuations joined)."""
    with open(path) as f:
        text = f.read()
    blocks = re.findall(
        re.escape(MARKER) + r"\s*```(?:bash|sh)\n(.*?)```", text, re.S
    )
    commands = []
    for block in blocks:
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            line = line.strip()
            if line and not line.startswith(("#", "pip install")):
                commands.append(line)
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    commands = readme_commands()
    if not commands:
        print(f"No block marked {MARKER} in README.md", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(commands))
        return 0
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="readme-") as folder:
        for command in commands:
            print(f"$ {command}", flush=True)
            started = time.perf_counter()
            done = subprocess.run(command, shell=True, cwd=folder)
            seconds = time.perf_counter() - started
            total += seconds
            print(f"[{seconds:.0f} s, exit {done.returncode}]", flush=True)
            if done.returncode != 0:
                return done.returncode
    print(f"README commands: {len(commands)} ran in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
