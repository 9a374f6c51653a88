"""LoRA / LoCon glue: key names of kohya, LyCORIS, PEFT and diffusers; shape validation."""

from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter
from ..algorithms.lora import lora_bypass, lora_delta_weight, lora_scale
from ..algorithms.op import LayerOp
from ..errors import AdapterTensorError
from . import AlgorithmSpec, register
from .base import BaseView, Patch, as_float32, squeeze_pointwise
from .dora import with_dora

SUFFIXES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "lora_B.bias": "up_bias",  # PEFT lora_bias=True (BFL Flux control LoRAs, Wan diff_b as LoRA bias)
    "lora_up.bias": "up_bias",
}


class LoraPatch(Patch):
    """ΔW = alpha/rank · up ⋅ (mid ⋅) down on one output slice; an up projection with a bias
    (PEFT's ``lora_bias``) moves the output by alpha/rank · that bias too."""

    def __init__(self, adapter: Adapter, op: LayerOp, out_features: int):
        super().__init__(adapter, op, out_features)
        t = adapter.tensors
        down, up, mid = t["down"], squeeze_pointwise(t["up"]), t.get("mid")
        rank = down.shape[0]
        in_per_group = op.in_features // op.groups
        self.check("up", up, (out_features, rank), f"a rank-{rank} update of {out_features} outputs")
        if mid is not None:
            down = squeeze_pointwise(down)
            self.check("down", down, (rank, op.in_features), "a Tucker down projection")
            self.check("mid", mid, (rank, rank, *op.kernel), "the Tucker core of this kernel")
        elif op.is_conv and down.dim() == 2 and all(k == 1 for k in op.kernel):
            down = down.reshape(*down.shape, *op.kernel)
        elif not op.is_conv:
            down = squeeze_pointwise(down)
        if mid is None:
            self.check("down", down, (rank, in_per_group, *op.kernel), "this layer's input")
        self.down, self.up, self.mid = down, up, mid  # kept in their own dtype: no copies
        self.scale = lora_scale(adapter.alpha, rank, adapter.rslora)
        up_bias = t.get("up_bias")
        if up_bias is not None:
            self.check("up_bias", up_bias, (out_features,), "the bias of the up projection")
            if {"magnitude", "dora_scale"} & set(t):
                raise AdapterTensorError(
                    f"{adapter.key}: DoRA with a bias on the up projection (lora_B.bias) is not defined "
                    "(PEFT refuses the combination too); re-export the adapter without lora_bias."
                )
            scaled = as_float32(up_bias) * self.scale
            self.diff_b = scaled if self.diff_b is None else self.diff_b + scaled

    def tensors(self) -> dict[str, Tensor]:
        t = {"down": self.down, "up": self.up}
        if self.mid is not None:
            t["mid"] = self.mid
        return t

    def delta_weight(self, weight: Tensor | None, strength: float) -> Tensor:
        mid = None if self.mid is None else self.mid.float()
        return lora_delta_weight(self.down.float(), self.up.float(), mid, self.scale * strength)

    def low_rank(self, x: Tensor) -> tuple[Tensor, Tensor, float] | None:
        if self.op.kind != "linear" or self.mid is not None or self.diff_b is not None:
            return None
        t = self.cast(x)
        return t["down"], t["up"], self.scale

    def bypass(self, x: Tensor, base: BaseView, strength: Tensor) -> Tensor:
        t = self.tensors_like(x)
        scale = strength.to(x.dtype) * self.scale
        if self.op.groups != 1:
            dense = lora_delta_weight(t["down"], t["up"], t.get("mid"), 1.0)
            return self.op.run(x, dense) * scale
        return lora_bypass(x, t["down"], t["up"], t.get("mid"), scale, self.op)


def _build(adapter: Adapter, op: LayerOp, out_features: int) -> Patch:
    return with_dora(adapter, op, out_features, LoraPatch(adapter, op, out_features))


register(
    AlgorithmSpec(
        name="lora",
        suffixes=SUFFIXES,
        identify=(frozenset({"down", "up"}),),
        build=_build,
        rank=lambda a: a.tensors["down"].shape[0],
        row_dims=lambda a: {"up": 0, "up_bias": 0},
    )
)
