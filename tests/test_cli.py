"""The command line: demo, inspect, exit codes; and the README (its commands and example run)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from loraplug.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_demo_passes():
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "demo passed" in result.output and "into fused slices" in result.output


def test_inspect_table_and_json(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(
        {
            "lora_unet_blocks_0_attn.lora_down.weight": torch.randn(4, 8),
            "lora_unet_blocks_0_attn.lora_up.weight": torch.randn(8, 4),
            "lora_unet_blocks_0_attn.alpha": torch.tensor(2.0),
        },
        str(path),
        metadata={"ss_base_model_version": "flux1", "ss_tag_frequency": "{}"},
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "kohya" in result.output and "flux1" in result.output
    result = runner.invoke(app, ["inspect", "--json", str(path)])
    data = json.loads(result.output)
    assert data[0]["ranks"] == {"4": 1} and data[0]["alphas"] == {"2.0": 1}


def test_bad_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    proc = subprocess.run(
        [sys.executable, "-m", "loraplug.cli", "inspect", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and "loraplug demo" in block[0] and "torch==2.13.0" in block[0]
    assert "pytest" in block[1]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["handle"].report.ok and len(namespace["handle"].report.fused) > 0
