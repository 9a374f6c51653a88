"""Orthogonal fine-tuning: block-diagonal (OFT) and butterfly (BOFT) rotations of the output.

A block b (b×b, skew part Q = b − bᵀ) gives the Cayley rotation R = (I + Q)(I − Q)⁻¹; with a
constraint c > 0 Q is first scaled to Frobenius norm ≤ c (COFT). The rotated weight is
W' = rescale ⊙ (M ⋅ W) per row block, M = I + s·(R − I) for strength s (Mᵀ in LyCORIS' index
order); rescale (per output row) is interpolated the same way, so s = 0 is the base.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cayley(blocks: Tensor, constraint: float = 0.0) -> Tensor:
    """Rotations from (…, b, b) blocks (computed in float32)."""
    q = (blocks - blocks.transpose(-1, -2)).float()
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def toward_identity(r: Tensor, strength: Tensor | float) -> Tensor:
    """I + s·(R − I) for a stack of rotations."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return eye + (r - eye) * strength


def rotate_blocks(z: Tensor, r: Tensor) -> Tensor:
    """Rotate the last dim of z (…, n·b) block by block: z'_k = R_kᵀ z_k (LyCORIS' order)."""
    n, b, _ = r.shape
    return torch.einsum("knm,...kn->...km", r, z.unflatten(-1, (n, b))).flatten(-2)


def butterfly(z: Tensor, r: Tensor) -> Tensor:
    """BOFT: m butterfly stages of (n, b, b) rotations ``r`` (m, n, b, b) on the last dim of z."""
    m, _, b, _ = r.shape
    half = b // 2
    for i in range(m):
        k = 2**i * half
        z = z.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
        z = torch.einsum("bij,...bj->...bi", r[i], z)
        z = z.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
    return z


def rows_last(w: Tensor) -> Tensor:
    """A weight (out, in, *k) with its output rows moved to the last dim (to rotate them)."""
    return w.movedim(0, -1)


def rows_first(z: Tensor) -> Tensor:
    return z.movedim(-1, 0)


def skew_from_packed(packed: Tensor, block_size: int) -> Tensor:
    """PEFT's OFT storage: (n, b(b−1)/2) upper-triangle entries -> (n, b, b) skew-symmetric."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    q = packed.new_zeros(packed.shape[0], block_size, block_size)
    q[:, rows, cols] = packed
    return q - q.transpose(-1, -2)


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """PEFT's rotation: (I − Q)(I + Q)⁻¹ exactly (terms=0), or its truncated Neumann series
    I + 2Q + 2Q² + … + Q^(terms−1) as PEFT evaluates it (use_cayley_neumann)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if terms <= 0:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def coft_project(packed: Tensor, block_size: int, eps: float) -> Tensor:
    """PEFT's COFT: each block's skew matrix pulled to Frobenius norm ≤ eps/√n (packed in and out)."""
    q = skew_from_packed(packed, block_size)
    eps = eps / q.shape[0] ** 0.5
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    q = torch.where(norm <= eps, q, eps * q / norm)
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    return q[:, rows, cols]


def rotate_input_blocks(z: Tensor, r: Tensor) -> Tensor:
    """PEFT OFT on the input: the last dim of z in blocks, z_k ⋅ R_k (row-vector convention)."""
    n, b, _ = r.shape
    return torch.einsum("...nk,nkc->...nc", z.unflatten(-1, (n, b)), r).flatten(-2)


def peft_butterfly_perm(n: int, blocks: int, half: int, factor: int) -> Tensor:
    """PEFT BOFT's block butterfly permutation of n indices (its ``block_butterfly_perm``)."""
    indices = torch.arange(n)
    if factor == 0:
        return indices
    size = n // blocks
    step = size // half
    order = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    sorted_order = torch.cat([torch.arange(int(p) * half, int(p) * half + half) for p in order])
    for start in range(0, n, size):
        indices[start : start + size] = indices[start : start + size][sorted_order]
    return indices


def peft_butterfly_matrix(blocks: Tensor, n: int) -> Tensor:
    """PEFT BOFT's dense rotation M (n×n) from boft_R (m, d, b, b): Π_i P_i ⋅ blockdiag(R_i) ⋅ P_iᵀ,
    R_i = (I − S)(I + S)⁻¹ with S the skew part (S = (R − Rᵀ)/2)."""
    m, d, b, _ = blocks.shape
    skew = 0.5 * (blocks - blocks.transpose(-1, -2)).float()
    eye = torch.eye(b, dtype=skew.dtype, device=skew.device).expand_as(skew)
    rot = torch.linalg.solve(eye + skew, eye - skew, left=False)
    total = None
    for i in range(m):
        perm = peft_butterfly_perm(n, d // 2**i, b // 2, m - 1).to(blocks.device)
        p = torch.eye(n, dtype=rot.dtype, device=rot.device)[perm]
        stage = p @ torch.block_diag(*rot[i]) @ p.T
        total = stage if total is None else stage @ total
    return total
