"""Tests of the shipped shapes models (vitlens.zoo) and their training script."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from vitlens.datasets import CLASS_NAMES
from vitlens.errors import ModelLoadError, OptionError, VitlensError
from vitlens.zoo import ZOO_DIR, available, load_shipped
from vitlens.zoo.train import EVAL_SEED, VAL_SEED, evaluate_shipped, main, train, train_seed

NAMES = ["vit-shapes", "swin-shapes"]
MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    return request.param, load_shipped(request.param)


def test_available_lists_both_with_scores():
    models = available()
    assert set(NAMES) <= set(models)
    for name in NAMES:
        cfg = models[name]
        for key in ("family", "timm_class", "kwargs", "class_names", "input_size", "mean", "std", "scores", "train"):
            assert key in cfg, (name, key)
        assert cfg["class_names"] == list(CLASS_NAMES)
        assert cfg["input_size"] == [3, 64, 64]
        assert 0.0 <= cfg["scores"]["one_object_top1"] <= 1.0
        for key in ("seed", "steps", "wall_seconds", "command"):
            assert key in cfg["train"]


@pytest.mark.parametrize("name", NAMES)
def test_file_sizes(name):
    for suffix in (".safetensors", ".json"):
        path = ZOO_DIR / f"{name}{suffix}"
        assert path.is_file(), path
        assert path.stat().st_size <= MAX_BYTES, path


def test_loaded_model_metadata(shipped):
    name, model = shipped
    assert not model.training
    assert model.vitlens_name == name
    assert model.vitlens_class_names == list(CLASS_NAMES)
    for cfg in (model.pretrained_cfg, model.default_cfg):
        assert cfg["input_size"] == (3, 64, 64)
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
        assert cfg["num_classes"] == 8 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    # timm's own data config resolves to the shipped normalisation
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 64, 64)
    assert tuple(data_cfg["mean"]) == tuple(model.pretrained_cfg["mean"])
    assert data_cfg["crop_pct"] == 1.0 and data_cfg["interpolation"] == "bilinear"
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 8)


def test_vit_architecture():
    model = load_shipped("vit-shapes")
    assert type(model) is VisionTransformer
    grid = model.patch_embed.grid_size
    assert grid[0] >= 8 and grid[1] >= 8
    assert model.cls_token is not None and model.num_prefix_tokens == 1
    assert len(model.blocks) >= 6
    assert all(block.attn.num_heads >= 4 for block in model.blocks)
    assert model.global_pool == "token"
    # a timm PatchEmbed (plain, or the documented conv-stem fallback) on an 8x8 px grid
    from timm.layers import PatchEmbed

    assert isinstance(model.patch_embed, PatchEmbed)
    assert tuple(model.patch_embed.patch_size) == (8, 8)
    assert model.patch_embed.num_patches == grid[0] * grid[1]
    tokens = model.forward_features(torch.zeros(1, 3, 64, 64))
    assert tokens.shape[1] == 1 + grid[0] * grid[1]


def test_swin_architecture():
    model = load_shipped("swin-shapes")
    assert type(model) is SwinTransformer
    assert len(model.layers) >= 2
    merges = [stage.downsample for stage in model.layers[1:]]
    assert all(isinstance(m, PatchMerging) for m in merges)
    for stage in model.layers:
        res = stage.blocks[0].input_resolution
        shifts = [block.shift_size for block in stage.blocks]
        assert any(max(s) > 0 for s in shifts), f"no shifted window in stage at {res}"
        for block in stage.blocks:
            assert block.window_size[0] < res[0] and block.window_size[1] < res[1]


def test_unknown_name_lists_available():
    with pytest.raises(ModelLoadError) as info:
        load_shipped("vit-circles")
    assert isinstance(info.value, VitlensError)
    assert "vit-shapes" in str(info.value) and "swin-shapes" in str(info.value)


def test_seeds_are_disjoint():
    seeds = {train_seed(s, c) for s in range(3) for c in range(2000)}
    assert not seeds & {EVAL_SEED, EVAL_SEED + 1, VAL_SEED, VAL_SEED + 1}


# Targets of the issue: one-object top-1 >= 95 %, two-object both-in-top-2 >= 90 %.
# Both shipped models meet them (swin-shapes after a third training stage, see
# vitlens/zoo/TRAINING.md: 95.1 % / 90.1 %).
FLOORS = {"vit-shapes": (0.95, 0.90), "swin-shapes": (0.95, 0.90)}


@pytest.fixture(scope="module")
def held_out():
    """Scores on 1000 + 1000 fresh images (a seed never used in training), per model."""
    return {name: evaluate_shipped(load_shipped(name), n=1000, seed=EVAL_SEED) for name in NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_held_out_scores(name, held_out):
    """Fresh-image scores reach the model's floor and reproduce the json's numbers."""
    scores = held_out[name]
    one, two = FLOORS[name]
    assert scores["one_object_top1"] >= one, scores
    assert scores["two_object_both_in_top2"] >= two, scores
    recorded = available()[name]["scores"]
    assert recorded["seed"] == EVAL_SEED and recorded["n_per_set"] == 1000
    for key in ("one_object_top1", "two_object_both_in_top2"):  # same images, same weights
        assert abs(recorded[key] - scores[key]) <= 0.003, (key, recorded, scores)


@pytest.mark.slow  # trains a model (a few steps) and evaluates it
@pytest.mark.parametrize("name", NAMES)
def test_train_tiny_run_writes_loadable_files(name, tmp_path):
    info = train(name, steps=3, batch_size=8, chunk_size=16, val_every=2, val_n=8, eval_n=8,
                 out_dir=tmp_path, progress=False)
    assert info["train"]["steps"] == 3 and len(info["train"]["curve"]) == 2
    assert (tmp_path / f"{name}.safetensors").is_file()
    cfg = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(cfg["scores"]) >= {"one_object_top1", "two_object_both_in_top2"}
    model = load_shipped(name, directory=tmp_path)
    assert type(model).__name__ == ("VisionTransformer" if name == "vit-shapes" else "SwinTransformer")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 8)
    # the shipped files are untouched
    assert (ZOO_DIR / f"{name}.safetensors").is_file()


@pytest.mark.slow  # trains twice
def test_train_is_reproducible(tmp_path):
    kw = dict(steps=2, batch_size=4, chunk_size=8, val_every=5, val_n=4, eval_n=4, progress=False)
    a = train("swin-shapes", out_dir=tmp_path / "a", **kw)
    b = train("swin-shapes", out_dir=tmp_path / "b", **kw)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "swin-shapes.safetensors"))
    wb = load_file(str(tmp_path / "b" / "swin-shapes.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["scores"] == b["scores"]


@pytest.mark.slow  # trains a model through the command line
def test_cli_trains_and_records_its_command(tmp_path, capsys):
    assert main(["--model", "vit-shapes", "--steps", "2", "--batch-size", "4", "--eval-n", "4",
                 "--val-every", "5", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "vit-shapes.json").is_file()
    cfg = json.loads((tmp_path / "vit-shapes.json").read_text())
    assert cfg["train"]["command"].startswith("python -m vitlens.zoo.train --model vit-shapes")


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        main(["--model", "resnet"])
    with pytest.raises(OptionError):
        train("resnet", steps=1)
    with pytest.raises(OptionError):
        evaluate_shipped(load_shipped("vit-shapes"), n=0)


@pytest.mark.slow  # trains
def test_grown_blocks_start_as_the_identity(tmp_path):
    """--init from a shallower Swin: new blocks get zero output projections, so the
    deeper model computes exactly what the trained one did before training on."""
    from vitlens.zoo import build_from_config
    from vitlens.zoo.train import _load_growing

    kw = dict(steps=1, batch_size=4, chunk_size=8, val_every=5, val_n=4, eval_n=4, progress=False)
    small = train("swin-shapes", out_dir=tmp_path / "small", depths=[2, 2], **kw)
    assert small["kwargs"]["depths"] == [2, 2]
    deep_cfg = {**small, "kwargs": {**small["kwargs"], "depths": [2, 4]}}
    deep = build_from_config(deep_cfg).eval()
    grown = _load_growing(deep, tmp_path / "small" / "swin-shapes.safetensors")
    assert grown == ["layers.1.blocks.2", "layers.1.blocks.3"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), load_shipped("swin-shapes", directory=tmp_path / "small")(x))
    grown_run = train("swin-shapes", out_dir=tmp_path / "deep", depths=[2, 4],
                      init_from=tmp_path / "small" / "swin-shapes.safetensors", **kw)
    assert grown_run["train"]["grown_blocks"] == grown
    with pytest.raises(OptionError, match="depths"):
        train("vit-shapes", depths=[2, 2], **kw)
    with pytest.raises(OptionError, match="holds weights this architecture lacks"):
        train("swin-shapes", out_dir=tmp_path / "x", depths=[2, 1],
              init_from=tmp_path / "small" / "swin-shapes.safetensors", **kw)


@pytest.mark.slow  # trains with a teacher
def test_distillation_from_a_shipped_teacher(tmp_path):
    """The second-stage recipe of swin-shapes: KD from vit-shapes (+ the stem hint)."""
    kw = dict(steps=2, batch_size=4, chunk_size=8, val_every=5, val_n=4, eval_n=4, progress=False)
    teacher = ZOO_DIR / "vit-shapes.safetensors"
    info = train("swin-shapes", out_dir=tmp_path, teacher=teacher, kd_weight=0.5, hint_weight=1.0, **kw)
    recorded = info["train"]["teacher"]
    assert recorded["weights"] == str(teacher) and recorded["kd_weight"] == 0.5 and recorded["hint_weight"] == 1.0
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in info["train"]["curve"])
    plain = train("swin-shapes", out_dir=tmp_path / "plain", **kw)
    assert plain["train"]["teacher"] is None
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "swin-shapes.safetensors")), load_file(str(tmp_path / "plain" / "swin-shapes.safetensors"))
    assert set(a) == set(b)  # the distillation heads are not part of the shipped model
    assert not all(torch.equal(a[k], b[k]) for k in a)  # and the teacher changed the training


def test_available_shows_a_table_of_names_and_scores_and_curves_only_on_request():
    import vitlens as vl

    shown = repr(vl.models.available())
    lines = shown.splitlines()
    assert len(lines) == 3 and "one-object top-1" in lines[0]
    assert lines[2].startswith("vit-shapes") and "96.3 %" in lines[2] and "93.3 %" in lines[2]
    assert "step" not in shown and "curve" not in vl.models.available()["vit-shapes"]["train"]
    assert vl.models.available()["vit-shapes"]["scores"]["one_object_top1"] == 0.963  # still the configs
    with_curves = vl.models.available(curves=True)
    assert "curve" in with_curves["vit-shapes"]["train"] and "| step |" in repr(with_curves)
    assert "<table>" in vl.models.available()._repr_html_()


# ----------------------------------------------------------------- one-object accuracy on unseen seeds (#30.6)
Z = 1.959963984540054


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_wilson_interval_at_none_and_all_correct_is_the_closed_form(n):
    from vitlens.zoo import wilson_interval

    # with p = 0 the interval is [0, z²/(n + z²)]; with p = 1, [n/(n + z²), 1]
    assert wilson_interval(0, n) == pytest.approx((0.0, Z * Z / (n + Z * Z)), abs=1e-12)
    assert wilson_interval(n, n) == pytest.approx((n / (n + Z * Z), 1.0), abs=1e-12)


def test_wilson_interval_is_symmetric_contains_the_proportion_and_narrows_with_n():
    from vitlens.zoo import wilson_interval

    for k, n in ((3, 10), (951, 1000), (1910, 2000)):
        low, high = wilson_interval(k, n)
        assert low < k / n < high
        flipped = wilson_interval(n - k, n)
        assert (1 - flipped[1], 1 - flipped[0]) == pytest.approx((low, high), abs=1e-12)
        wide = wilson_interval(k, n, z=2 * Z)
        assert wide[0] < low and wide[1] > high
    assert wilson_interval(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=1e-7)  # centred at 0.5
    width = lambda k, n: wilson_interval(k, n)[1] - wilson_interval(k, n)[0]  # noqa: E731
    assert width(500, 1000) < width(50, 100) < width(5, 10)
    with pytest.raises(OptionError, match="correct <= n"):
        wilson_interval(11, 10)


def test_the_unseen_seeds_are_used_nowhere_else():
    from vitlens.demo import DEMO_SEED
    from vitlens.zoo.train import UNSEEN_SEEDS, _TRAIN_SEED_BASE

    used = {EVAL_SEED, EVAL_SEED + 1, VAL_SEED, VAL_SEED + 1, DEMO_SEED}
    assert len(set(UNSEEN_SEEDS)) == 2 and not set(UNSEEN_SEEDS) & used
    assert max(UNSEEN_SEEDS) < train_seed(0, 0) == _TRAIN_SEED_BASE


@pytest.mark.parametrize("name", NAMES)
def test_the_shown_interval_agrees_with_the_stored_counts(name):
    """`vl.models.available()` and the README show the interval computed from the json's counts."""
    from pathlib import Path

    import vitlens as vl
    from vitlens.zoo import unseen_accuracy, wilson_interval
    from vitlens.zoo.train import UNSEEN_SEEDS

    record = available()[name]["scores"]["one_object_unseen"]
    assert record["seeds"] == list(UNSEEN_SEEDS) and record["images_per_seed"] == 1000
    correct, n = sum(record["correct"]), 2000
    low, high = wilson_interval(correct, n)
    acc = unseen_accuracy(available()[name])
    assert (acc["correct"], acc["n"], acc["low"], acc["high"]) == (correct, n, low, high)
    text = f"{100 * correct / n:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"
    row = next(line for line in repr(vl.models.available()).splitlines() if line.startswith(name))
    assert row.endswith(text)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    readme_row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
    assert readme_row.rstrip(" |").endswith(text)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_stored_unseen_counts_are_the_models(name):
    """The json's count for the first unseen seed is what the shipped weights score on its images."""
    from vitlens.zoo.train import UNSEEN_SEEDS, unseen_one_object

    stored = available()[name]["scores"]["one_object_unseen"]["correct"][0]
    assert unseen_one_object(load_shipped(name), seeds=UNSEEN_SEEDS[:1])["correct"] == [stored]
