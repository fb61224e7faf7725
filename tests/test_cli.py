"""The ``vitlens explain`` command: folders, readable overlays, unique names, no silent overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_images
from PIL import Image

import vitlens as vl
from vitlens.cli import main

TINY = ["--model", "vit-shapes", "--method", "rollout"]


def _image(path: Path, seed: int, size: int = 64) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((random_images(1, size, seed=seed)[0] * 255).astype(np.uint8)).save(path)
    return str(path)


def test_explain_writes_readable_overlays_and_the_capture(tmp_path, capsys):
    paths = [_image(tmp_path / f"img{i}.png", i) for i in range(2)]
    out = tmp_path / "out"
    assert main(["explain", *paths, *TINY, "--out", str(out), "--target", "star"]) == 0
    overlay = Image.open(out / "img0_rollout.png")
    assert overlay.size == (448, 448)  # the 64 px model input, scaled up to be readable
    assert Image.open(out / "img1_input.png").size == (448, 448)
    assert main(["explain", paths[0], *TINY, "--out", str(tmp_path / "small"), "--size", "64"]) == 0
    assert Image.open(tmp_path / "small" / "img0_rollout.png").size == (64, 64)
    star = vl.load_model("vit-shapes").pretrained_cfg["label_names"].index("star")
    assert vl.open(out / "capture.nc").target.values.tolist() == [star, star]
    printed = capsys.readouterr().out
    assert "explaining class" in printed and "(star," in printed and "wrote 4 PNG files" in printed


def test_explain_accepts_folders(tmp_path, capsys):
    folder = tmp_path / "pics"
    for i in range(3):
        _image(folder / f"p{i}.png", i)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["explain", str(folder), *TINY, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_rollout.png")) == ["p0_rollout.png", "p1_rollout.png", "p2_rollout.png"]
    assert "wrote 6 PNG files" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(tmp_path / "empty"), *TINY, "--out", str(out)]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_same_named_images_from_different_folders_get_distinct_outputs(tmp_path, capsys):
    a, b = _image(tmp_path / "a" / "img.png", 1), _image(tmp_path / "b" / "img.png", 2)
    out = tmp_path / "out"
    assert main(["explain", a, b, *TINY, "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["a_img_input.png", "a_img_rollout.png", "b_img_input.png", "b_img_rollout.png"]
    assert "wrote 4 PNG files" in capsys.readouterr().out
    first, second = (np.asarray(Image.open(out / f"{k}_img_input.png")) for k in "ab")
    assert not np.array_equal(first, second)  # neither overwrote the other


def test_existing_files_in_out_are_not_replaced_without_overwrite(tmp_path, capsys):
    path = _image(tmp_path / "img.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img_rollout.png").write_bytes(b"my own file")
    assert main(["explain", path, *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds 1" in err and "img_rollout.png" in err and "--overwrite" in err
    assert (out / "img_rollout.png").read_bytes() == b"my own file"
    assert not (out / "img_input.png").exists()  # refused before writing anything
    assert main(["explain", path, *TINY, "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out / "img_rollout.png").size == (448, 448)


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys):
    path = _image(tmp_path / "img.png", 1)
    (tmp_path / "taken").write_text("x")
    assert main(["explain", path, *TINY, "--out", str(tmp_path / "taken")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "x"


def test_random_weights_and_offline_pretrained_are_reported_in_cli_words(tmp_path, capsys):
    path = _image(tmp_path / "img.png", 1, size=32)
    args = ["explain", path, "--model", "vit_tiny_patch16_224", "--method", "rollout"]
    assert main([*args, "--target", "1", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: --model vit_tiny_patch16_224 has RANDOM weights" in err and "--checkpoint FILE" in err
    assert main([*args, "--pretrained", "--out", str(tmp_path / "o2")]) == 2  # HF_HUB_OFFLINE=1 in the tests
    err = capsys.readouterr().err
    assert "--checkpoint path/to/model.safetensors" in err and "checkpoint=" not in err
    assert main(["explain", path, "--model", "vit-shapes", "--checkpoint", path, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "drop --checkpoint/--pretrained" in err and "pretrained=" not in err


def test_cli_reports_vitlens_errors_without_a_traceback(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "missing.png"), *TINY, "--out", str(tmp_path / "o")]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "--method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("paths,expected", [
    (["a/img.png", "b/img.png", "c.png"], ["a_img", "b_img", "c"]),
    (["x/a/img.png", "y/a/img.png"], ["x_a_img", "y_a_img"]),
    (["x.png", "x.png"], ["x", "x-2"]),
])
def test_output_stems_are_unique(paths, expected, tmp_path, monkeypatch):
    from vitlens.explain_cli import output_stems

    monkeypatch.chdir(tmp_path)
    assert output_stems([Path(p) for p in paths]) == expected


def test_a_repeated_image_never_takes_another_images_output_name(tmp_path, capsys):
    """Issue 31.5: ``x-2.png x.png x.png`` wrote x-2's outputs twice and reported 6 files where 4 existed."""
    other, same = _image(tmp_path / "x-2.png", 1), _image(tmp_path / "x.png", 2)
    out = tmp_path / "out"
    assert main(["explain", other, same, same, *TINY, "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 6
    assert "wrote 6 PNG files" in capsys.readouterr().out
    ours = np.asarray(Image.open(out / "x-2_input.png"))
    assert not np.array_equal(ours, np.asarray(Image.open(out / "x_input.png")))
    for name in written:  # every output of the repeated image shows x.png, never x-2.png
        if name.endswith("_input.png") and not name.startswith("x-2_"):
            assert not np.array_equal(np.asarray(Image.open(out / name)), ours), name


@pytest.mark.parametrize("paths,expected", [
    (["x-2.png", "x.png", "x.png"], ["x-2", "x", "x-3"]),
    (["a/X.png", "b/x.png"], ["a_X", "b_x"]),  # one file on a case-insensitive disk (macOS, Windows)
])
def test_output_stems_stay_unique_against_every_other_name(paths, expected, tmp_path, monkeypatch):
    from vitlens.explain_cli import output_stems

    monkeypatch.chdir(tmp_path)
    assert output_stems([Path(p) for p in paths]) == expected


@pytest.mark.parametrize("option, value, words", [
    ("--size", "100000", "--size 100000: give at most"),
    ("--size", "8", "--size 8: give at least 16"),
    ("--alpha", "1.5", "--alpha 1.5: give an opacity between 0 and 1"),
    ("--alpha", "-0.1", "--alpha -0.1: give an opacity between 0 and 1"),
    ("--alpha", "nan", "--alpha nan: give an opacity between 0 and 1"),
])
def test_absurd_sizes_and_opacities_are_refused_before_any_work(option, value, words, tmp_path, capsys, monkeypatch):
    """Issue 31.8/31.10: ``--size 100000`` tried to allocate 30 GB; ``--alpha`` outside [0, 1] passed silently."""
    path = _image(tmp_path / "img.png", 1)
    monkeypatch.setattr(vl, "load_model", lambda *a, **k: pytest.fail("refused only after loading the model"))
    assert main(["explain", path, *TINY, option, value, "--out", str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_on_a_missing_gpu_is_a_clear_error_before_any_work(monkeypatch, capsys):
    """Issue 31.10: ``vitlens bench --device cuda`` without a GPU ended in torch's raw error."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vl.models, "load_model", lambda *a, **k: pytest.fail("refused only after loading the model"))
    assert main(["bench", "--device", "cuda", "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda is not available here" in err and "--device cpu" in err


def test_explain_names_a_wrong_method_with_a_hint_and_records_the_pass_a_named_method_needs(tmp_path, capsys):
    path = _image(tmp_path / "img.png", 3)
    assert main(["explain", path, "--model", "vit-shapes", "--method", "rolout", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--method 'rolout'" in err and "Did you mean 'rollout'" in err
    # LeGrad reads a pass of its own, made only when named: the command records it for that method
    out = tmp_path / "legrad"
    assert main(["explain", path, "--model", "vit-shapes", "--method", "legrad", "--out", str(out)]) == 0
    assert (out / "img_legrad.png").exists()
    assert float(vl.explain(vl.open(out / "capture.nc"), "legrad").std()) > 0
