"""Where the training kernels' first non-finite value appears in a bf16 tiny Flux (fused q/k/v)
step: each forward/backward call checked, its shapes printed (a GPU debugging aid)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ["LORAPLUG_TRAIN_KERNELS"] = "1"
import loraplug as lp  # noqa: E402
from loraplug.runtime import train_kernels as tk  # noqa: E402


def checked(fn, name):
    def call(*args):
        out = fn(*args)
        bad = [i for i, t in enumerate(out) if t is not None and not torch.isfinite(t).all()]
        shapes = [tuple(a.shape) if torch.is_tensor(a) else a for a in args]
        print(name, shapes, "non-finite outputs", bad, flush=True)
        return out

    return call


tk.forward, tk.backward = checked(tk.forward, "forward"), checked(tk.backward, "backward")
from diffusers import FluxTransformer2DModel  # noqa: E402

torch.manual_seed(0)
model = FluxTransformer2DModel(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 14, 14],
).cuda().bfloat16()  # fmt: skip
model.fuse_qkv_projections()
model.requires_grad_(False)
handle = lp.create(model, "lora", rank=8, targets="attn+mlp", init="random")
inputs = dict(
    hidden_states=torch.randn(1, 64, 16, device="cuda").bfloat16(),
    encoder_hidden_states=torch.randn(1, 24, 64, device="cuda").bfloat16(),
    pooled_projections=torch.randn(1, 32, device="cuda").bfloat16(),
    timestep=torch.tensor([0.5], device="cuda").bfloat16(),
    img_ids=torch.zeros(64, 3, device="cuda"), txt_ids=torch.zeros(24, 3, device="cuda"), return_dict=False,
)  # fmt: skip
model(**inputs)[0].float().pow(2).mean().backward()
print("grads finite:", all(torch.isfinite(p.grad).all().item() for p in handle.parameters()))
