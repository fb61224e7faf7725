"""load_model: timm names, local checkpoints, modules, and offline errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

import vitlens as vl


def test_timm_names_and_modules_load_in_eval_mode():
    model = vl.load_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2)
    assert type(model).__name__ == "VisionTransformer" and not model.training and model.num_classes == 4
    same = make_vit()
    assert vl.load_model(same) is same


def test_unknown_names_get_suggestions():
    with pytest.raises(vl.ModelLoadError, match="vit_tiny_patch16_224"):
        vl.load_model("vit_tiny_patch16_2244")


def test_pretrained_without_network_says_how_to_pass_a_checkpoint():
    with pytest.raises(vl.ModelLoadError, match="checkpoint="):
        vl.load_model("vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoints_load_through_timms_pretrained_path(tmp_path, suffix):
    kw = dict(num_classes=4, img_size=32, patch_size=8, depth=2)
    source = vl.load_model("vit_tiny_patch16_224", **kw)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = vl.load_model("vit_tiny_patch16_224", checkpoint=path, **kw)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(vl.ModelLoadError, match="does not exist"):
        vl.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "none.safetensors")
    bad = tmp_path / "bad.pth"
    torch.save({"nonsense": torch.zeros(3)}, bad)
    with pytest.raises(vl.ModelLoadError, match="could not load checkpoint"):
        vl.load_model("vit_tiny_patch16_224", checkpoint=bad, img_size=32, patch_size=8, depth=2)
