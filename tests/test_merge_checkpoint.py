"""`loraplug merge`: streamed checkpoint merges equal the in-memory merge, handle fp8 with scales,
and stay within ~one tensor of memory on a 2 GB checkpoint."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import loraplug as lp
from loraplug.cli import app
from loraplug.demo import diffusers_lora_file
from loraplug.testing import bfl_layers, tiny_flux

runner = CliRunner()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_streamed_merge_equals_in_memory_merge(tmp_path, layout):
    flux = tiny_flux()
    model = flux if layout == "diffusers" else bfl_layers(flux)[0]
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    a = diffusers_lora_file(flux, tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1)
    b = diffusers_lora_file(flux, tmp_path / "b.safetensors", rank=2, alpha=2.0, seed=2)
    out = tmp_path / "merged.safetensors"
    result = runner.invoke(
        app, ["merge", str(base), str(a), str(b), "-o", str(out), "--strength", "0.7", "--strength", "1.2"]
    )
    assert result.exit_code == 0, result.output
    merged, original = load_file(str(out)), load_file(str(base))
    with lp.merge(model, [a, b], strength=[0.7, 1.2]):
        expected = model.state_dict()
        changed = 0
        for key, tensor in expected.items():
            assert torch.equal(merged[key], tensor), key
            changed += not torch.equal(tensor, original[key])
    assert changed == (24 if layout == "diffusers" else 10)  # every targeted weight (fused ones once)


def test_scaled_fp8_checkpoint_is_requantized(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(16, 8)
    scale = weight.abs().max() / 448
    base = tmp_path / "fp8.safetensors"
    save_file({"diffusion_model.lin.weight": (weight / scale).to(torch.float8_e4m3fn),
               "diffusion_model.lin.scale_weight": scale.reshape(1), "diffusion_model.lin.bias": torch.zeros(16)},
              str(base))  # fmt: skip
    lora = tmp_path / "l.safetensors"
    down, up = torch.randn(2, 8), torch.randn(16, 2)
    save_file(
        {"lin.lora_down.weight": down, "lin.lora_up.weight": up, "lin.alpha": torch.tensor(2.0)}, str(lora)
    )
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["merge", str(base), str(lora), "-o", str(out)])
    assert result.exit_code == 0 and "requantized" in result.output, result.output
    merged = load_file(str(out))
    assert merged["diffusion_model.lin.weight"].dtype == torch.float8_e4m3fn
    got = merged["diffusion_model.lin.weight"].float() * merged["diffusion_model.lin.scale_weight"]
    want = (weight / scale).to(torch.float8_e4m3fn).float() * scale + up @ down
    assert (got - want).abs().max() <= 0.07 * want.abs().max()  # fp8 e4m3: 3 mantissa bits
    assert not torch.equal(merged["diffusion_model.lin.scale_weight"], scale.reshape(1))


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({"lin.weight": torch.randn(4, 4)}, str(base))
    lora = tmp_path / "l.safetensors"
    save_file(
        {"other.lora_down.weight": torch.randn(1, 4), "other.lora_up.weight": torch.randn(4, 1)}, str(lora)
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(base.read_bytes()[:-8])
    for args in (
        [str(base), str(lora)],
        [str(tmp_path / "missing.safetensors"), str(lora)],
        [str(corrupt), str(lora)],
    ):
        proc = subprocess.run([sys.executable, "-m", "loraplug.cli", "merge", *args, "-o", str(tmp_path / "o.safetensors")],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_two_gigabyte_checkpoint_merges_in_under_half_a_gigabyte(tmp_path):
    """Peak RSS of the merge process (torch import included) on a 2 GB bf16 checkpoint."""
    base = tmp_path / "big.safetensors"
    rows, cols, count = 4096, 4096, 64  # 64 × 32 MB = 2 GiB
    names = [f"blocks.{i}.proj.weight" for i in range(count)]
    from loraplug.formats import stream

    stream.write(base, names, dict.fromkeys(names, torch.bfloat16), dict.fromkeys(names, (rows, cols)), {},
                 lambda k: torch.full((rows, cols), 0.5, dtype=torch.bfloat16))  # fmt: skip
    lora = tmp_path / "l.safetensors"
    save_file({f"blocks.{i}.proj.lora_A.weight": torch.ones(4, cols) * 1e-3 for i in range(0, count, 8)}
              | {f"blocks.{i}.proj.lora_B.weight": torch.ones(rows, 4) for i in range(0, count, 8)}, str(lora))  # fmt: skip
    out = tmp_path / "out.safetensors"
    code = (  # VmHWM: this process's own peak (ru_maxrss would inherit pytest's across exec)
        "from loraplug.cli import app\n"
        "try:\n"
        f"    app(['merge', '{base}', '{lora}', '-o', '{out}'], standalone_mode=False)\n"
        "finally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK_MB', int(hwm) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = float(proc.stdout.split("PEAK_MB")[1])
    assert peak < 500, f"peak RSS {peak:.0f} MB"
    assert abs(out.stat().st_size - base.stat().st_size) < 256  # same tensors, a metadata line more
    reader = stream.Reader(out)
    assert torch.allclose(
        reader.tensor("blocks.8.proj.weight").float(), torch.full((rows, cols), 0.5 + 4e-3), atol=1e-2
    )
    assert torch.equal(
        reader.tensor("blocks.1.proj.weight"), torch.full((rows, cols), 0.5, dtype=torch.bfloat16)
    )
    reader.close()


def test_bench_shows_a_saved_run_and_needs_a_gpu_to_run(tmp_path):
    import json

    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"device": "H200", "torch": "2.11", "base_ms": 100.0,
                                 "loraplug_fused_r16_ms": 109.0, "loraplug_fused_r16_ratio": 1.09}))  # fmt: skip
    result = runner.invoke(app, ["bench", "--results", str(saved)])
    assert result.exit_code == 0 and "1.090" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench"])
        assert result.exit_code == 2 and "CUDA" in result.output
