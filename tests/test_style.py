"""The code stays ruff-clean (lint and format)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            *args,
            "src",
            "tests",
            "benchmarks",
            "examples",
            "comfyui_loraplug",
            "tests_comfy",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
