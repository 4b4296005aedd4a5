"""Every command the README shows works in a fresh shell as written: each program it calls is
found once the README's activation line has run (a fresh `env -i` shell, nothing inherited),
and the cheap ones run exactly as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ACTIVATE = "source .venv/bin/activate"
# Shell builtins and keywords: nothing to find on PATH.
BUILTINS = {"source", "export", "cd", "echo"}


def readme_commands() -> list[str]:
    """Each line of the README's bash blocks (without its comment and trailing `&`), and each
    inline code span that is a command of one of the programs a user types."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip().removesuffix("&").strip()
            if line and not line.startswith("#"):
                commands.append(line)
    for span in re.findall(r"`([^`\n]+)`", text):
        if re.match(r"(make|dvc|prefect|mlflow|python -m) ", span) and "<" not in span:
            commands.append(span)
    return commands


def program(command: str) -> str:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    assert words, command
    return words[0]


def fresh_shell(script: str) -> subprocess.CompletedProcess:
    """`script` in bash with the environment a new login would have, nothing of this one."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


needs_venv = pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "activate").is_file(), reason="no .venv (run `make install`)"
)


def test_the_readme_says_to_activate_the_environment_before_its_commands():
    text = README.read_text()
    assert ACTIVATE in text
    first_hand_command = min(
        text.index(f"\n{word}")
        for word in ("dvc ", "prefect ", "mlflow ", "python -m")
        if f"\n{word}" in text
    )
    assert text.index(ACTIVATE) < first_hand_command


@needs_venv
def test_every_program_the_readme_calls_is_found_in_a_fresh_shell():
    programs = sorted({program(c) for c in readme_commands()} - BUILTINS)
    assert {"make", "dvc", "prefect", "mlflow", "python"} <= set(programs)
    script = f"{ACTIVATE} && " + " && ".join(f"command -v {shlex.quote(p)}" for p in programs)
    done = fresh_shell(script)
    assert done.returncode == 0, f"not found in a fresh shell: {programs}\n{done.stderr}"


@needs_venv
@pytest.mark.parametrize(
    "command",
    [
        "python -m ubo_core.stages summary",
        "python -m ubo_core.train --help",
        "python -m flows.ui --help",
        "prefect --version",
        "dvc dag",
    ],
)
def test_cheap_readme_commands_run_as_written_in_a_fresh_shell(command):
    shown = command.split(" --")[0]  # --help / --version: the README's command, safely
    assert shown in README.read_text(), f"{shown!r} is not in the README any more"
    done = fresh_shell(f"{ACTIVATE} && {command}")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_venv
@pytest.mark.parametrize("target", ["benchmark", "report", "test", "ui", "tune", "summary"])
def test_the_readmes_make_targets_exist(target):
    assert f"make {target}" in README.read_text()
    done = fresh_shell(f"make -n {target}")
    assert done.returncode == 0, done.stderr
