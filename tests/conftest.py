import copy
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from loraplug.testing import import_comfyui

settings.register_profile("ci", max_examples=15, deadline=None)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("deep", max_examples=600, deadline=None)  # HYPOTHESIS_PROFILE=deep: a bug hunt
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _triton_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


# Triton's interpreter runs the kernels on the CPU from 3.7 on (3.6's cannot convert their scalars)
interpreted = pytest.mark.skipif(
    _triton_version() < (3, 7), reason="needs Triton 3.7 or later (its interpreter)"
)


def snapshot(model):
    """Every parameter and buffer, cloned, by state_dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_identical(model, snap):
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(snap), "state_dict keys changed"
    for k, v in sd.items():
        assert v.dtype == snap[k].dtype, k
        assert torch.equal(v.detach(), snap[k]), f"{k} changed"


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def randomize_(module, prefix_filter=("lora_",), std=0.1, seed=0):
    """Fill adapter parameters (name containing one of prefix_filter) with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(f in name for f in prefix_filter):
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "magnitude" in name else 0.0))


def compiled_graphs(model, run):
    """(``run(torch.compile(model))``'s result, the text of every graph Dynamo made on the way),
    compiled with a backend that records each graph and runs it as traced."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    result = run(torch.compile(model, backend=record))
    torch._dynamo.reset()
    return result, graphs


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test ends with the environment it started with: PEFT's BOFT layer (an oracle here)
    leaves CC=gcc and CXX=gcc behind after trying to build its CUDA extension, and Inductor in a
    later subprocess then linked its C++ with gcc (undefined libstdc++ symbols)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def clone():
    return copy.deepcopy


COMFY = Path(__file__).resolve().parents[2] / "shared" / "comfyui"


@pytest.fixture(scope="session")
def comfy_utils(tmp_path_factory):
    """ComfyUI's comfy.utils (key maps) from ../shared/comfyui, imported from a writable copy."""
    if not COMFY.exists():
        pytest.skip("no ComfyUI tree beside the checkout (../shared/comfyui)")
    argv = sys.argv
    root = import_comfyui(COMFY, tmp_path_factory.mktemp("comfy"))
    try:
        import comfy.utils

        return comfy.utils
    finally:
        sys.argv = argv
        sys.path.remove(str(root))
