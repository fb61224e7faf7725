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


# -- the adapter registry (issue 14) -------------------------------------------------------
def test_register_adapter_adds_a_family_and_the_first_match_wins():
    from vitlens.models import registry
    from vitlens.models.adapter import Adapter

    class Marker(torch.nn.Sequential):
        pass

    @vl.models.register_adapter
    class SequentialAdapter(Adapter):
        family = "test-sequential"

        @classmethod
        def matches(cls, model):
            return isinstance(model, Marker)

    try:
        assert "test-sequential" in registry.families()
        assert type(vl.models.adapter_for(Marker())) is SequentialAdapter
        assert vl.models.adapter_for(make_vit()).family == "vit"  # built-ins still first
        with pytest.raises(ValueError, match="already registered"):
            vl.models.register_adapter(type("Again", (Adapter,), {"family": "test-sequential"}))
        with pytest.raises(TypeError):
            vl.models.register_adapter(int)
    finally:
        registry._ADAPTERS.remove(SequentialAdapter)
    with pytest.raises(vl.UnsupportedModelError, match="vit, swin, eva, beit, swinv2"):
        vl.models.adapter_for(Marker())


def test_every_builtin_family_is_registered_in_a_stable_order():
    from vitlens.models import registry

    assert registry.families()[:5] == ["vit", "swin", "eva", "beit", "swinv2"]


@pytest.mark.parametrize("name,block,instead", [
    ("cait_xxs24_224", "ClassAttn", "deit3_"),
    ("xcit_nano_12_p16_224", "cross-covariance", "vit_"),
    ("swinv2_cr_tiny_ns_224", "SwinV2-CR", "swinv2_"),
])
def test_refusals_name_what_is_missing_and_a_supported_alternative(name, block, instead):
    import timm

    model = timm.create_model(name, pretrained=False)
    with pytest.raises(vl.UnsupportedModelError) as err:
        vl.models.adapter_for(model)
    assert block in str(err.value) and instead in str(err.value)


def test_no_refusal_asks_to_change_a_pretrained_architecture():
    from vitlens.models import registry

    registry.adapters()  # loads every family module and its refusals
    texts = ["".join(r.texts()) for r in registry._REFUSALS]
    assert len(texts) >= 10
    for text in texts:
        assert "global_pool=" not in text and "create the model with" not in text.lower()


def test_an_unsupported_model_is_told_timm_families_from_transformers_classes():
    """#32.6: a ResNet was told that hf_clip and hf_siglip are "timm families"."""
    import re

    import timm

    pytest.importorskip("transformers")
    from vitlens.models import registry

    with pytest.raises(vl.UnsupportedModelError) as err:
        vl.models.adapter_for(timm.create_model("resnet18", num_classes=3))
    text = str(err.value)
    timm_families = re.search(r"timm families: ([\w, ]+)", text).group(1).split(", ")
    assert timm_families == [a.family for a in registry.adapters() if a.timm_modules]
    assert timm_families[:5] == ["vit", "swin", "eva", "beit", "swinv2"]
    hf = text[text.index("transformers classes"):]
    for name in ("ViTForImageClassification", "SwinForImageClassification", "CLIPModel", "SiglipModel"):
        assert name in hf, name
    assert re.search(r"vl\.with_head.*ViTModel|ViTModel.*vl\.with_head", hf)
    assert "hf_" not in text
