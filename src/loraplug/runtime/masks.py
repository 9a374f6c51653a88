"""Region masks: a per-adapter weight over the tokens (or pixels) of every module's output.

A mask is given once, in image space (H×W or B×H×W, any resolution) or as tokens ((T,) or (B, T)),
and mapped onto each module's output layout: conv feature maps (B, C, H, W) at their own
resolution; transformer tokens (B, T, C) by stream: image-stream modules get the mask on their
token grid (Flux's packed 2×2 latents included: the grid is the token grid), text-stream modules
get ``text_value``, joint modules (Flux single blocks: text tokens then image tokens) get
[text_value … | image mask]. Resized masks are cached per output shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HandleError

TEXT = re.compile(
    r"(add_[qkv]_proj|to_add_out|to_added_qkv|ff_context\.|norm1_context|txt_attn|txt_mlp|txt_mod|context_block\."
    r"|attentions\.\d+\.transformer_blocks\.\d+\.attn2\.to_[kv]$)"  # UNet cross-attention keys/values
)
JOINT = re.compile(r"(?:^|\.)(single_transformer_blocks|single_blocks)\.\d+\.")
IMAGE = re.compile(r"(?:^|\.)(transformer_blocks|double_blocks|joint_blocks)\.\d+\.")


def token_stream(module: str) -> str | None:
    """'text', 'joint' (text then image tokens), 'image', or None where the layout is not known."""
    if TEXT.search(module):
        return "text"
    if JOINT.search(module):
        return "joint"
    if IMAGE.search(module):
        return "image"
    return None


def _grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid with h·w = tokens closest to the mask's aspect ratio."""
    target = math.sqrt(tokens * height / width)
    divisors = [h for h in range(1, tokens + 1) if tokens % h == 0]
    h = min(divisors, key=lambda d: abs(d - target))
    return h, tokens // h


def _resize(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) -> (B, h, w): area-averaged when shrinking, bilinear when growing."""
    shrink = size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]
    out = F.interpolate(mask[:, None], size=size, mode="area" if shrink else "bilinear",
                        **({} if shrink else {"align_corners": False}))  # fmt: skip
    return out[:, 0]


@dataclass(eq=False)
class Mask:
    """The mask of one adapter set; ``value`` None means no mask."""

    value: Tensor | None = None
    spatial: bool = False
    text_value: float = 1.0
    text: Tensor | None = None
    image_tokens: int | None = None
    _cache: dict = field(default_factory=dict)

    def set(
        self,
        value: Tensor | None,
        text_value: float = 1.0,
        tokens: bool | None = None,
        text: Tensor | None = None,
    ) -> None:
        """A new mask (kept as float32); ``tokens`` forces the reading of a 2-D mask as (B, T);
        ``text`` ((T_txt,) or (B, T_txt)) weights text tokens one by one instead of ``text_value``."""
        self._cache.clear()
        self.text_value = float(text_value)
        if text is not None:
            text = torch.as_tensor(text).float()
            text = text[None] if text.dim() == 1 else text
        self.text = text
        if value is None:
            self.value = None
            return
        value = torch.as_tensor(value).float()
        if value.dim() not in (1, 2, 3):
            raise HandleError(f"a mask is (T,), (B, T), (H, W) or (B, H, W); got shape {tuple(value.shape)}.")
        self.spatial = value.dim() == 3 or (value.dim() == 2 and not tokens)
        if self.spatial and value.dim() == 2:
            value = value[None]
        self.value = (
            value if self.value is None or self.value.shape != value.shape else self.value.copy_(value)
        )

    def weights(self, y: Tensor, channel_dim: int, stream: str | None) -> Tensor | None:
        """The mask shaped to broadcast against the output slice ``y`` (None: unmasked)."""
        if self.value is None:
            return None
        key = (tuple(y.shape), channel_dim, stream, y.device, y.dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = self._compute(y, channel_dim, stream)
        if out is not None:
            out = out.to(device=y.device, dtype=y.dtype)
            if not torch.compiler.is_compiling():
                self._cache[key] = out
        return out

    def _compute(self, y: Tensor, channel_dim: int, stream: str | None) -> Tensor | None:
        if not self.spatial and self.value.shape[-1] == 1:  # (B, 1): one weight per sample, every token
            return self.value.reshape(-1, *([1] * (y.dim() - 1)))
        if y.dim() == 4 and channel_dim == 1:  # conv feature map (B, C, H, W)
            h, w = y.shape[-2:]
            m = _resize(self.value, (h, w)) if self.spatial else self.value.reshape(-1, h, w)
            return m[:, None]
        if y.dim() != 3:
            return None  # no token axis (modulation vectors, pooled embeddings)
        tokens = y.shape[1]
        if stream == "text":
            return self._text(tokens)[..., None]
        if stream == "joint":
            image = self._image(self.image_tokens or self._token_count(tokens))
            text = self._text(tokens - image.shape[1])
            batch = max(image.shape[0], text.shape[0])
            return torch.cat([text.expand(batch, -1), image.expand(batch, -1)], 1)[..., None]
        self.image_tokens = tokens
        return self._image(tokens)[..., None]

    def _text(self, tokens: int) -> Tensor:
        """(B|1, tokens) text-token weights."""
        if self.text is None:
            return torch.full((1, tokens), self.text_value)
        if self.text.shape[-1] != tokens:
            raise HandleError(f"a text mask of {self.text.shape[-1]} tokens met {tokens} text tokens.")
        return self.text

    def _token_count(self, tokens: int) -> int:
        if self.spatial:
            raise HandleError(
                "a spatial mask reached a joint (text+image) block before any image-stream module told how "
                "many image tokens there are; pass a token mask, or image_tokens= to set_mask."
            )
        return self.value.shape[-1]

    def _image(self, tokens: int) -> Tensor:
        """(B|1, tokens) image-token weights."""
        if self.spatial:
            h, w = _grid(tokens, *self.value.shape[-2:])
            return _resize(self.value, (h, w)).reshape(self.value.shape[0], -1)
        m = self.value if self.value.dim() == 2 else self.value[None]
        if m.shape[-1] != tokens:
            raise HandleError(
                f"a token mask of {m.shape[-1]} tokens met a module output of {tokens} image tokens."
            )
        return m
