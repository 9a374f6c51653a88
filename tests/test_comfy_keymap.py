"""ComfyUI's own Flux key map (comfy.utils.flux_to_diffusers, from ../shared/comfyui) as the oracle
for loraplug's Flux tables, in both directions."""

import pytest
import torch

from loraplug.arch import ModelIndex
from loraplug.testing import bfl_layers, tiny_flux


@pytest.fixture(scope="module")
def comfy_flux_map(comfy_utils):
    config = {"depth": 2, "depth_single_blocks": 2, "hidden_size": 16, "guidance_embed": True}
    return comfy_utils.flux_to_diffusers(config, output_prefix="")


def _weight_entries(key_map, linear_names):
    """diffusers module -> (BFL module, slice or None, swapped) for every Linear weight entry."""
    out = {}
    for key, value in key_map.items():
        if not key.endswith(".weight"):
            continue
        target, sl, fn = (value, None, None) if isinstance(value, str) else (*value, None)[:3]
        bfl = target.removesuffix(".weight")
        if bfl in linear_names:
            out[key.removesuffix(".weight")] = (bfl, sl, fn is not None)
    return out


def test_diffusers_names_on_bfl_layout_match_comfyui(comfy_flux_map):
    bfl, _ = bfl_layers(tiny_flux())
    linear = {n for n, m in bfl.named_modules() if isinstance(m, torch.nn.Linear)}
    entries = _weight_entries(comfy_flux_map, linear)
    assert len(entries) > 30
    index = ModelIndex(bfl)
    for diffusers_name, (module, sl, swapped) in entries.items():
        targets, reason = index.lookup(diffusers_name)
        assert targets is not None, (diffusers_name, reason)
        if swapped:
            half = targets[0].size
            assert [(t.module, t.offset, t.rows) for t in targets] == [
                (module, half, (0, half)),
                (module, 0, (half, half)),
            ]
        else:
            assert len(targets) == 1 and targets[0].module == module
            assert targets[0].slice == (tuple(sl) if sl else None), diffusers_name


def test_bfl_names_on_diffusers_layout_match_comfyui(comfy_flux_map):
    model = tiny_flux()
    bfl, _ = bfl_layers(model)
    linear = {n for n, m in bfl.named_modules() if isinstance(m, torch.nn.Linear)}
    entries = _weight_entries(comfy_flux_map, linear)
    expected: dict[str, set] = {}
    for diffusers_name, (module, sl, swapped) in entries.items():
        if swapped:
            continue
        rows = None if sl is None else (sl[1], sl[2])
        expected.setdefault(module, set()).add((diffusers_name, rows))
    index = ModelIndex(model)
    for module, parts in expected.items():
        targets, reason = index.lookup(module)
        assert targets is not None, (module, reason)
        assert {(t.module, t.rows) for t in targets} == parts, module
