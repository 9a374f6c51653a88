"""ComfyUI from ../shared/comfyui (copied: it writes next to itself), imported with --cpu."""

import sys
from pathlib import Path

import pytest
import torch

from loraplug.testing import import_comfyui

COMFY = Path(__file__).resolve().parents[2] / "shared" / "comfyui"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if not COMFY.exists():
        pytest.skip("no ComfyUI tree beside the checkout")
    root = import_comfyui(COMFY, tmp_path_factory.mktemp("comfy"))
    sys.path.insert(0, str(ROOT))  # the node pack
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    import folder_paths

    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras))
    return {"comfy": comfy, "folder_paths": folder_paths, "loras": loras, "root": root}


UNET = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 16,
        "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [4, 4, 8], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False}  # fmt: skip


def tiny_flux_patcher(comfy_env, seed=0):
    comfy = comfy_env["comfy"]
    config = comfy.supported_models.Flux(dict(UNET))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def run(patcher, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, 16, generator=g)
    y = torch.randn(1, 8, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.5]), context, y=y)
