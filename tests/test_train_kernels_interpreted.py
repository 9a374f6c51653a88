"""The training kernels (``runtime.train_kernels``) under the Triton interpreter on the CPU: the
same outputs and gradients as the portable path for LoRAs on q/k/v slices of one Linear (float32
and fp16 masters, with and without bias, with and without an input gradient, under torch.compile),
and the layers they leave to the portable path. The GPU tests run them compiled."""

import os
import subprocess
import sys

from conftest import interpreted

INTERPRETED = """
import torch
from torch import nn
import loraplug as lp
from loraplug import arch
from loraplug.runtime import kernels
from loraplug.runtime.bypass import runners

SLICES = {"q": (0, 128), "k": (128, 128), "v": (256, 128), "odd": (0, 96), "rest": (96, 288)}
arch.PROVIDERS.append(lambda model, ops: ({n: [arch.Target("layer", o, s)] for n, (o, s) in SLICES.items()}
                                          if hasattr(model, "layer") else {}, set()))
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
DT = torch.float16
calls = []
from loraplug.runtime import train_kernels as tk
forward = tk.forward
tk.forward = lambda *a: calls.append(1) or forward(*a)

def layer_with(names, masters=torch.float32, bias=True, rank=4):
    holder = nn.Module()
    holder.layer = nn.Linear(72, 384, bias=bias).to(DT)
    handle = lp.create(holder, "lora", rank=rank, alpha=2.0, targets=[f"^{n}$" for n in names], init="random", dtype=masters)
    return holder, handle

def step(holder, handle, kernels_on, x_grad=True):
    torch.manual_seed(1)
    x = torch.randn(3, 37, 72, dtype=DT, requires_grad=x_grad)
    gy = torch.randn(3, 37, 384, dtype=DT)
    runners(holder.layer).trains = kernels_on
    params = handle.parameters()
    for p in params:
        p.grad = None
    y = holder.layer(x)
    y.backward(gy)
    return [y.detach(), *([x.grad] if x_grad else []), *[p.grad for p in params]]

for masters in (torch.float32, DT):
    for bias in (True, False):
        for x_grad in (True, False):
            holder, handle = layer_with("qkv", masters, bias)
            before = len(calls)
            got = step(holder, handle, True, x_grad)
            assert len(calls) == before + 1, "the kernels did not run"
            want = step(holder, handle, False, x_grad)
            assert len(calls) == before + 1
            assert all(g.dtype == w.dtype for g, w in zip(got, want))
            errors = [rel(g, w) for g, w in zip(got, want)]
            assert max(errors) < 2e-3, (masters, bias, x_grad, errors)
            handle.remove()

# under torch.compile: the registered operators, the same numbers as eager
holder, handle = layer_with("qkv")
eager = step(holder, handle, True)
compiled = torch.compile(holder.layer)
x = torch.randn(3, 37, 72, dtype=DT, requires_grad=True)
before = len(calls)
compiled(x).sum().backward()
assert len(calls) == before  # compiled graphs call the operator, not the eager launcher
handle.remove()

# what stays on the portable path: slices off the 128-column grid, mixed ranks, inference, masks
for names in (["odd", "rest"], ["rest"]):  # a slice starting at column 96; columns left bare
    holder, handle = layer_with(names)
    before = len(calls)
    step(holder, handle, True)
    assert len(calls) == before, names
    handle.remove()
holder = nn.Module()
holder.layer = nn.Linear(72, 384).to(DT)
a = lp.create(holder, "lora", rank=4, targets=["^q$"], init="random")
before = len(calls)
step(holder, a, True)
assert len(calls) == before, "q alone leaves columns bare"
with torch.no_grad():
    holder.layer(torch.randn(4, 72, dtype=DT))
assert len(calls) == before
a.remove()
print("ok")
"""


@interpreted
def test_training_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "LORAPLUG_TRAIN_KERNELS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
