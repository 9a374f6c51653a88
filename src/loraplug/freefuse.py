"""FreeFuse-style automatic region masks for several subject LoRAs in one image.

As its authors do it for FLUX.1-dev: (1) run the first steps (5 of 28) with the LoRAs off and, at
the last of them, read one attention (Flux: the last double block; SDXL: a cross-attention) —
each LoRA's concept tokens (its subject phrase found in the prompt through the tokenizer's
offsets, stopwords dropped) score the image tokens by softmaxed query·key similarity; the scores
are made contrastive (own minus the others), the top 10 % image tokens become anchors and their
queries are spread to every image token by cosine similarity; an optional background channel
comes from background words or the EOS token. (2) The maps become disjoint binary masks (argmax
with a balanced-area correction, a small morphological clean-up) at token resolution. (3) The
LoRAs run masked from the same noise: image tokens by the masks, each LoRA's text stream zeroed
at the other LoRAs' concept tokens. (4) Optionally, attention is biased (−4 toward the other
subjects' words and regions, +2 toward one's own). Every constant is a parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STOPWORDS = frozenset(
    "a an the of and or with in on at to for from by is are was were be his her their its this that these "
    "those as into over under near wearing holding".split()
)


@dataclass
class FreeFuseConfig:
    collect_step: int = 5  # the steps run with LoRAs off; attention is read at the last of them
    total_steps: int = 28
    top_fraction: float = 0.10
    background: bool = True
    balance_iterations: int = 20
    balance_rate: float = 0.5
    cleanup_radius: int = 1
    bias_own: float = 2.0
    bias_other: float = -4.0
    stopwords: frozenset[str] = field(default_factory=lambda: STOPWORDS)


def concept_tokens(tokenizer, prompt: str, phrase: str, stopwords: frozenset[str] = STOPWORDS) -> list[int]:
    """Indices of the prompt's tokens that spell ``phrase`` (every occurrence), stopwords dropped.
    Needs a fast tokenizer (character offsets)."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(phrase), prompt, flags=re.IGNORECASE)]
    if not spans:
        raise ValueError(f"the phrase {phrase!r} does not occur in the prompt {prompt!r}")
    out = []
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        word = prompt[start:end].strip().lower()
        if end > start and word and word not in stopwords and any(start < e and end > s for s, e in spans):
            out.append(i)
    return out


def eos_token(tokenizer, prompt: str) -> int:
    """The index of the end-of-sequence token (the background's stand-in)."""
    ids = tokenizer(prompt)["input_ids"]
    return max(i for i, t in enumerate(ids) if t == tokenizer.eos_token_id)


class AttentionProbe:
    """Reads image queries and text keys of one attention module during armed forwards.

    Flux (joint attention): the normalised queries (``norm_q``) and text keys (``norm_added_k``),
    RoPE applied to the queries as the model does; cross-attention (SDXL ``attn2``): ``to_q`` and
    ``to_k`` outputs. Keeps the last capture only.
    """

    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.heads = getattr(attention, "heads", None)
        self.armed = False
        self.query: Tensor | None = None
        self.key: Tensor | None = None
        self._rope = None
        self._hooks = []
        if getattr(attention, "norm_added_k", None) is not None:
            self._hooks += [
                attention.register_forward_pre_hook(self._grab_rope, with_kwargs=True),
                attention.norm_q.register_forward_hook(lambda m, a, out: self._keep("query", out)),
                attention.norm_added_k.register_forward_hook(lambda m, a, out: self._keep("key", out)),
            ]
        else:
            self._hooks += [
                attention.to_q.register_forward_hook(lambda m, a, out: self._keep("query", out)),
                attention.to_k.register_forward_hook(lambda m, a, out: self._keep("key", out)),
            ]

    def _grab_rope(self, module, args, kwargs):
        if self.armed:
            self._rope = kwargs.get("image_rotary_emb")

    def _keep(self, name: str, out: Tensor) -> None:
        if not self.armed:
            return
        out = out.detach().float()
        if out.dim() == 3:  # (B, T, H·D) -> (B, T, H, D)
            out = out.unflatten(-1, (self.heads, -1))
        setattr(self, name, out)

    def queries(self) -> Tensor:
        """(B, T_img, H, D) image queries as the attention sees them."""
        q = self.query
        if self._rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = self._rope
            tokens = cos.shape[0]
            full = torch.cat([q.new_zeros(q.shape[0], tokens - q.shape[1], *q.shape[2:]), q], 1)
            q = apply_rotary_emb(full, (cos.float(), sin.float()), sequence_dim=1)[
                :, tokens - self.query.shape[1] :
            ]
        return q

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def concept_maps(query: Tensor, key: Tensor, concepts: list[list[int]], top_fraction: float = 0.10,
                 background: list[int] | None = None) -> Tensor:  # fmt: skip
    """(B, n[+1], T_img) maps in [-1, 1]: contrastive attention scores pick anchors, anchors spread
    to all image tokens by query similarity. ``background`` token indices add a last channel."""
    d = query.shape[-1]
    probs = (
        torch.einsum("bthd,bshd->bhts", query, key).div(math.sqrt(d)).softmax(-1).mean(1)
    )  # (B, T_img, T_txt)
    groups = [*concepts, *([background] if background else [])]
    scores = torch.stack([probs[..., idx].sum(-1) for idx in groups], 1)  # (B, C, T_img)
    contrast = scores * 2 - scores.sum(1, keepdim=True)  # own minus the others
    flat = F.normalize(query.flatten(2), dim=-1)  # (B, T_img, H·D)
    k = max(1, int(round(top_fraction * flat.shape[1])))
    anchors = contrast.topk(k, dim=-1).indices  # (B, C, k)
    maps = []
    for c in range(len(groups)):
        picked = torch.stack([flat[b, anchors[b, c]] for b in range(flat.shape[0])])  # (B, k, H·D)
        centre = F.normalize(picked.mean(1), dim=-1)
        maps.append(torch.einsum("btf,bf->bt", flat, centre))
    return torch.stack(maps, 1)


def masks_from_maps(maps: Tensor, grid: tuple[int, int], iterations: int = 20, rate: float = 0.5,
                    radius: int = 1) -> Tensor:  # fmt: skip
    """Disjoint binary masks (B, C, h, w) from maps (B, C, h·w): argmax with per-channel offsets
    nudged toward equal areas, then a morphological opening/closing of each mask."""
    b, c, _ = maps.shape
    offsets = torch.zeros(b, c, 1)
    for _ in range(iterations):
        winner = (maps + offsets).argmax(1)
        area = F.one_hot(winner, c).float().mean(1)  # (B, C)
        offsets -= rate * (area - 1.0 / c)[..., None] * maps.std()
    masks = F.one_hot((maps + offsets).argmax(1), c).permute(0, 2, 1).float().reshape(b, c, *grid)
    if radius > 0:
        k = 2 * radius + 1
        dilate = lambda m: F.max_pool2d(m, k, 1, radius)  # noqa: E731
        erode = lambda m: -F.max_pool2d(-m, k, 1, radius)  # noqa: E731
        cleaned = dilate(erode(erode(dilate(masks))))  # close, then open
        scores = cleaned + 1e-3 * masks  # keep every token owned by exactly one channel
        masks = F.one_hot(scores.argmax(1), c).permute(0, 3, 1, 2).float()
    return masks


def text_masks(concepts: list[list[int]], text_tokens: int) -> list[Tensor]:
    """Per LoRA: ones over the text tokens, zero at the other LoRAs' concept tokens."""
    out = []
    for i in range(len(concepts)):
        m = torch.ones(text_tokens)
        for j, idx in enumerate(concepts):
            if j != i:
                m[idx] = 0.0
        out.append(m)
    return out


def attention_bias(masks: Tensor, concepts: list[list[int]], text_tokens: int, own: float = 2.0,
                   other: float = -4.0) -> Tensor:  # fmt: skip
    """An additive attention bias (1, 1, T, T) over [text | image] tokens: each subject's image
    region and concept words attend +own to each other and +other to the other subjects'."""
    subjects = masks[0, : len(concepts)].flatten(1)  # (n, T_img), binary
    n, image = subjects.shape
    member = torch.zeros(n, text_tokens + image)
    for i, idx in enumerate(concepts):
        member[i, idx] = 1.0
        member[i, text_tokens:] = subjects[i]
    same = member.T @ member  # (T, T): 1 where query and key share a subject
    any_q, any_k = member.sum(0) > 0, member.sum(0) > 0
    both = any_q[:, None] & any_k[None, :]
    bias = torch.where(same > 0, torch.tensor(own), torch.where(both, torch.tensor(other), torch.tensor(0.0)))
    return bias[None, None]


class FreeFuse:
    """Drives the two passes around a user's sampling loop.

    ff = FreeFuse(handle, probe_module, concepts, grid=(h, w), text_tokens=T_txt)
    with ff.collecting():          # pass 1: LoRAs off, attention read at its last step
        run(steps=ff.config.collect_step)
    ff.apply()                     # masks computed and set, LoRAs on
    run(steps=ff.config.total_steps, **ff.attention_kwargs())   # pass 2, same noise
    """

    def __init__(self, handle, attention: nn.Module, concepts: list[list[int]], grid: tuple[int, int],
                 text_tokens: int, background: list[int] | None = None, config: FreeFuseConfig | None = None):  # fmt: skip
        self.handle, self.concepts, self.grid, self.text_tokens = handle, concepts, grid, text_tokens
        self.config = config or FreeFuseConfig()
        # the background channel: background words, else the last text token (the EOS stand-in;
        # pass eos_token(tokenizer, prompt) when padding follows it)
        self.background = background or ([text_tokens - 1] if self.config.background else None)
        self.probe = AttentionProbe(attention)
        self.masks: Tensor | None = None

    def collecting(self):
        ff = self

        class _Pass:
            def __enter__(self):
                ff.handle.disable()
                ff.probe.armed = True

            def __exit__(self, *exc):
                ff.probe.armed = False

        return _Pass()

    def apply(self) -> Tensor:
        """Compute the masks from the last capture, set them on the handle, enable the LoRAs."""
        if self.probe.query is None:
            raise RuntimeError("nothing was captured: run the model inside ff.collecting() first.")
        maps = concept_maps(self.probe.queries(), self.probe.key, self.concepts, self.config.top_fraction,
                            self.background if self.config.background else None)  # fmt: skip
        masks = masks_from_maps(maps, self.grid, self.config.balance_iterations, self.config.balance_rate,
                                self.config.cleanup_radius)  # fmt: skip
        self.masks = masks
        n = len(self.concepts)
        self.handle.set_mask(
            [masks[:, i] for i in range(n)], text=text_masks(self.concepts, self.text_tokens)
        )
        self.handle.enable()
        self.probe.remove()
        return masks

    def attention_kwargs(self) -> dict:
        """``joint_attention_kwargs`` for a diffusers Flux transformer carrying the attention bias."""
        bias = attention_bias(
            self.masks, self.concepts, self.text_tokens, self.config.bias_own, self.config.bias_other
        )
        return {"joint_attention_kwargs": {"attention_mask": bias}}
