"""The command line: demo, inspect, exit codes; and the README (its commands and example run)."""

import json
import re
import subprocess
import sys
import textwrap
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
        metadata={
            "ss_base_model_version": "flux1",
            "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx person": 12, "smiling": 3}}),
        },
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "kohya" in result.output and "flux1" in result.output
    result = runner.invoke(app, ["inspect", "--json", str(path)])
    data = json.loads(result.output)
    assert data[0]["ranks"] == {"4": 1} and data[0]["alphas"] == {"2.0": 1}
    assert data[0]["trigger_words"] == ["ohwx person", "smiling"] and data[0]["base_model"] == "flux1"


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


def test_readme_examples_run(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        namespace = {}
        code = textwrap.dedent(code)  # blocks inside list items are indented
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        if i == 0:
            assert namespace["handle"].report.ok and len(namespace["handle"].report.fused) > 0


def _flux_checkpoint(tmp_path):
    from loraplug.testing import tiny_flux

    model = tiny_flux()
    ckpt = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return model, ckpt


def _rank2_lora(model):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp"):
        m = dict(model.named_modules())[name]
        a, b = torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g)
        sd[f"transformer.{name}.lora_A.weight"] = torch.cat([a, a * 0.5, a * 0.25])  # rank 6 file,
        sd[f"transformer.{name}.lora_B.weight"] = torch.cat([b, b, b], 1) / 3  # rank-2 update
    return sd


def test_convert_with_model_dtype_and_resize(tmp_path):
    import loraplug as lp
    from loraplug.testing import flux_inputs

    model, ckpt = _flux_checkpoint(tmp_path)
    src = tmp_path / "in.safetensors"
    save_file(_rank2_lora(model), str(src))
    inputs = flux_inputs()
    with lp.apply(model, src), torch.no_grad():
        want = model(**inputs)[0]
    kohya = tmp_path / "k.safetensors"
    result = runner.invoke(app, ["convert", str(src), str(kohya), "--to", "kohya", "--resize-rank", "2"])
    assert result.exit_code == 0, result.output
    adapters = lp.load(kohya)
    assert {a.tensors["down"].shape[0] for a in adapters.adapters.values()} == {2}
    back = tmp_path / "p.safetensors"
    result = runner.invoke(
        app, ["convert", str(kohya), str(back), "--to", "peft", "--model", str(ckpt), "--dtype", "fp32"]
    )
    assert result.exit_code == 0, result.output
    for path in (kohya, back):
        with lp.apply(model, path), torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], want, rtol=1e-4, atol=1e-4)
    result = runner.invoke(app, ["convert", str(kohya), str(tmp_path / "x.safetensors"), "--to", "peft"])
    assert result.exit_code == 2 and "model" in result.output


def test_inspect_coverage_against_a_checkpoint(tmp_path):
    model, ckpt = _flux_checkpoint(tmp_path)
    sd = _rank2_lora(model)
    sd["transformer.not_a_module.lora_A.weight"] = torch.randn(2, 4)
    sd["transformer.not_a_module.lora_B.weight"] = torch.randn(4, 2)
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    result = runner.invoke(app, ["inspect", "--json", "--model", str(ckpt), str(src)])
    data = json.loads(result.output)[0]["coverage"]
    assert data["matched"] == 2 and list(data["unmatched"]) == ["transformer.not_a_module"]


def _entry_point():
    exe = Path(sys.executable).with_name("loraplug")
    assert exe.exists(), "the loraplug entry point is installed with the package"
    return str(exe)


def test_installed_entry_point_runs_the_readme_demo_command():
    """The README's first command ends with `loraplug demo`: run it as a user would."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n", readme).group(1)
    assert first.endswith("&& loraplug demo")
    proc = subprocess.run([_entry_point(), "demo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo passed" in proc.stdout


def test_installed_entry_point_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [_entry_point(), "inspect", str(tmp_path / "nope.safetensors")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr


def test_bench_shows_saved_runs_and_rejects_unknown_suites():
    for name in ("2026-11-29-s2-linear-stack-h200.json", "2026-11-29-s2-flux-eager-h200.json"):
        result = runner.invoke(app, ["bench", "--results", str(ROOT / "benchmarks" / "results" / name)])
        assert result.exit_code == 0, result.output
        assert "loraplug_auto" in result.output and "ratio" in result.output
    result = runner.invoke(app, ["bench", "--suite", "tiny"])
    assert result.exit_code == 2 and "--suite" in result.output


def test_bench_counts_compiled_graphs_and_breaks():
    """The benchmarks' record of what Dynamo made of a compiled model (graphs, breaks, reasons)."""
    from loraplug.bench import _compile, _graphs

    layer = torch.nn.Linear(4, 4)

    def broken(x):
        y = layer(x)
        print(end="")  # Dynamo breaks the graph here
        return y * 2

    _compile(broken)(torch.randn(2, 4))
    counts = _graphs()
    assert counts["graphs"] == 2 and counts["graph_breaks"] == 1 and "print" in counts["break_reasons"][0]
    _compile(layer)(torch.randn(2, 4))
    assert _graphs()["graphs"] == 1 and _graphs()["graph_breaks"] == 0
    torch._dynamo.reset()
