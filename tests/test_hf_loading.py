"""``vl.load_model("hf:...")``: transformers models from a directory or the cache, never downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from vitlens.errors import ModelLoadError  # noqa: E402
from vitlens.models import hf_loading  # noqa: E402
from vitlens.models.hf_loading import load_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tiny_vit_dir(tmp_path: Path, *, processor: bool = True, labels=("cat", "dog", "fox")) -> Path:
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = transformers.ViTForImageClassification(cfg)
    model.save_pretrained(tmp_path)
    if processor:
        transformers.ViTImageProcessor(
            size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
        ).save_pretrained(tmp_path)
    return tmp_path


def test_local_directory_loads_weights_labels_and_processor(tmp_path):
    d = _tiny_vit_dir(tmp_path)
    saved = transformers.ViTForImageClassification.from_pretrained(d)
    model = load_hf_model(f"hf:{d}")
    assert type(model).__name__ == "ViTForImageClassification"
    assert not model.training
    assert model.vitlens_class_names == ["cat", "dog", "fox"]
    assert model.vitlens_name == f"hf:{d}"
    proc = model.vitlens_image_processor
    assert list(proc.image_mean) == [0.1, 0.2, 0.3] and list(proc.image_std) == [0.4, 0.5, 0.6]
    for (name, p), (_, q) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert (p == q).all(), name


def test_num_classes_replaces_the_head(tmp_path):
    model = load_hf_model(f"hf:{_tiny_vit_dir(tmp_path)}", num_classes=5)
    assert model.classifier.out_features == 5


def test_directory_without_image_processor_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        load_hf_model(f"hf:{_tiny_vit_dir(tmp_path, processor=False)}")


def _drop_tensors(directory: Path, prefix: str) -> list[str]:
    """Remove every saved tensor whose name starts with ``prefix`` (a partial download, a pruned file)."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    dropped = sorted(k for k in tensors if k.startswith(prefix))
    assert dropped, prefix
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    return dropped


def test_a_directory_missing_backbone_weights_is_refused_naming_them(tmp_path):
    """#31.7: transformers fills missing tensors with random values and only its log says so."""
    d = _tiny_vit_dir(tmp_path)
    _drop_tensors(d, "vit.encoder.layer.0.attention")
    with pytest.raises(ModelLoadError, match=r"missing .*layers\.0\.attention\.q_proj\.weight") as err:
        load_hf_model(f"hf:{d}")
    assert "random" in str(err.value).lower() and "save_pretrained" in str(err.value)
    assert "mlp" not in str(err.value)  # only what is missing is named


def test_a_directory_missing_only_the_head_loads_with_a_loud_warning(tmp_path):
    import vitlens as vl

    d = _tiny_vit_dir(tmp_path)
    _drop_tensors(d, "classifier")
    with pytest.warns(vl.RandomWeightsWarning, match=r"classifier\.weight"):
        load_hf_model(f"hf:{d}")
    import warnings

    with warnings.catch_warnings():  # a new head asked for with num_classes= is no surprise
        warnings.simplefilter("error", vl.RandomWeightsWarning)
        assert load_hf_model(f"hf:{d}", num_classes=5).classifier.out_features == 5


def test_an_absurd_config_is_refused_before_anything_is_built(tmp_path):
    """#31.8: a config.json asking for 20,000 layers used to hang for minutes while transformers built them."""
    import json
    import time

    d = _tiny_vit_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 20_000
    (d / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"20000 layers.*num_hidden_layers"):
        load_hf_model(f"hf:{d}")
    assert time.perf_counter() - t < 10
    from vitlens.models.hf_loading import check_config_sizes

    with pytest.raises(ModelLoadError, match=r"5000 layers \(text_config\.num_hidden_layers\)"):  # nested configs
        check_config_sizes(transformers.CLIPConfig(text_config={"num_hidden_layers": 5000}), "clip")
    with pytest.raises(ModelLoadError, match=r"2006 layers \(depths\)"):  # Swin: all stages together
        check_config_sizes(transformers.SwinConfig(depths=[2, 2, 2000, 2]), "swin")
    for real in (transformers.ViTConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48),
                 transformers.CLIPConfig(), transformers.SwinConfig()):
        check_config_sizes(real, "real")  # ViT-bigG-sized, CLIP and Swin defaults pass


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf_model(f"hf:{tmp_path}")


def test_empty_name_is_refused():
    with pytest.raises(ModelLoadError, match="repository id or a directory"):
        load_hf_model("hf:")


class _NoNetwork:
    """Fails the test if anything opens a connection; records from_pretrained calls."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = transformers.AutoConfig.from_pretrained

        def from_pretrained(*args, **kwargs):
            self.calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)


def test_offline_mode_fails_at_once_without_touching_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_connection(*args, **kwargs):
        raise AssertionError("vitlens opened a network connection in offline mode")

    monkeypatch.setattr(hf_loading.socket, "create_connection", no_connection)
    spy = _NoNetwork(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"hf:/path/to/DIR") as err:
        load_hf_model("hf:nobody-xyz/not-cached-vit")
    assert "offline" in str(err.value)
    assert spy.calls and all(c.get("local_files_only") for c in spy.calls)


def test_unreachable_hub_fails_after_one_probe_without_a_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise OSError("no route to host")

    monkeypatch.setattr(hf_loading.socket, "create_connection", unreachable)
    spy = _NoNetwork(monkeypatch)
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_hf_model("hf:nobody-xyz/not-cached-vit")
    assert len(probes) == 1
    # only the cache was asked: no download attempt (which would retry for a minute)
    assert spy.calls and all(c.get("local_files_only") for c in spy.calls)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_vitlens_never_imports_transformers():
    out = _run("import sys, vitlens; print('transformers' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_without_transformers_hf_names_name_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import vitlens as vl\n"
        "try:\n"
        "    vl.load_model('hf:google/vit-base-patch16-224')\n"
        "except vl.VitlensError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ModelLoadError")
    assert 'pip install "vitlens[hf]"' in out.stdout


def test_unsupported_transformers_models_are_refused_naming_the_supported_classes():
    import numpy as np

    import vitlens as vl
    from vitlens.models import registry
    from vitlens.models.hf_common import HFAdapter

    explained = [c.name for a in registry.adapters() if issubclass(a, HFAdapter) for c in a.classes]
    headless = [b.name for a in registry.adapters() if issubclass(a, HFAdapter) for b in a.backbones]
    assert len(explained) == 10 and len(headless) == 6
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=16, patch_size=8)
    with pytest.raises(vl.VitlensError, match="ViTModel: vitlens cannot explain .*ViTForImageClassification") as err:
        vl.capture(transformers.ViTModel(cfg), np.zeros((1, 16, 16, 3)))
    instead = str(err.value).split("Supported models of a similar kind: ")[1]
    assert instead.rstrip(".").split(", ") == explained  # every class an adapter declares, and only those
    for name in headless:  # a headless backbone is told about vl.with_head
        assert name in str(err.value).split("vl.with_head")[0], name


def test_an_older_transformers_is_refused_with_the_upgrade_to_run(monkeypatch):
    import vitlens as vl

    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=16, patch_size=8, num_labels=2)
    model = transformers.ViTForImageClassification(cfg)
    from vitlens.models import hf_common

    monkeypatch.setattr(hf_common, "transformers_version", lambda: "4.46.0")
    with pytest.raises(vl.UnsupportedModelError, match=r"transformers >= 5 \(installed: 4.46.0\).*--upgrade"):
        vl.models.adapter_for(model)


def test_vitlens_explain_takes_a_transformers_directory(tmp_path, capsys):
    """The command line goes through vl.load_model and vl.capture: a saved transformers classifier
    and its image processor explain a picture of another size, as a timm model does."""
    import numpy as np
    from PIL import Image

    import vitlens as vl
    from vitlens.cli import main

    d = _tiny_vit_dir(tmp_path / "model")
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "x.png"), "--model", f"hf:{d}", "--method", "rollout",
                 "--out", str(out)]) == 0
    assert "explaining class" in capsys.readouterr().out
    cap = vl.open(out / "capture.nc")
    assert cap.attrs["family"] == "hf_vit" and cap.attrs["class_names"] == ["cat", "dog", "fox"]
    assert list(cap.attrs["mean"]) == [0.1, 0.2, 0.3]  # the directory's own image processor
    assert Image.open(out / "x_rollout.png").size[0] > 0
