"""load_model's weights: random weights warn loudly; pretrained without a network fails at once."""

from __future__ import annotations

import time
import warnings

import pytest

import vitlens as vl

TINY = dict(num_classes=4, img_size=32, patch_size=8, depth=1)


def test_a_timm_name_without_weights_warns_that_they_are_random():
    with pytest.warns(vl.RandomWeightsWarning, match="RANDOM weights.*checkpoint=.*pretrained=False"):
        vl.load_model("vit_tiny_patch16_224", **TINY)
    assert issubclass(vl.RandomWeightsWarning, UserWarning)


def test_random_weights_asked_for_and_shipped_models_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", vl.RandomWeightsWarning)
        vl.load_model("vit_tiny_patch16_224", pretrained=False, **TINY)
        vl.load_model("vit-shapes")


@pytest.fixture
def hub_online(monkeypatch):
    """A hub that is not in offline mode but cannot be reached (a closed local port)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached


@pytest.mark.parametrize("offline_env", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_pretrained_without_network_fails_at_once_and_says_how_to_pass_a_file(offline_env, monkeypatch, request):
    if not offline_env:
        request.getfixturevalue("hub_online")
    from huggingface_hub import constants

    start = time.perf_counter()
    with pytest.raises(vl.ModelLoadError, match=r"checkpoint='path/to/model\.safetensors'") as info:
        vl.load_model("vit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - start < 15  # timm's hub retries took 46 s
    assert "no connection" in str(info.value)
    assert "--checkpoint path/to/model.safetensors" in info.value.cli_message
    assert constants.HF_HUB_OFFLINE is (True if offline_env else False)  # offline mode only within the call


def test_hub_reachable_is_false_for_a_closed_port(hub_online):
    from vitlens.models.loading import hub_reachable

    start = time.perf_counter()
    assert hub_reachable(timeout=2) is False
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize("typo, want", [("eva02_tiny_patch14_22", "eva02_tiny_patch14_224"),
                                        ("beit_base_patch16", "beit_base_patch16_224"),
                                        ("swinv2_tiny_window8", "swinv2_tiny_window8_256"),
                                        ("vit-shape", "vit-shapes")])
def test_a_mistyped_name_gets_suggestions_from_every_family_vitlens_explains(typo, want):
    with pytest.raises(vl.ModelLoadError, match="Did you mean") as err:
        vl.load_model(typo)
    assert repr(want) in str(err.value)
