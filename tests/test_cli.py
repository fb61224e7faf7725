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
