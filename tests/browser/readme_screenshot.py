"""Make ``docs/explorer.png``, the README's Explorer screenshot, from the shipped trained ``vit-shapes``.

    python -m tests.browser.readme_screenshot [--out docs/explorer.png] [--width 1100]
    python -m tests.browser.readme_screenshot --ablate [--out docs/explorer_ablate.png]

Serves a one-cell notebook (``notebook_template.README``) with Voila on
127.0.0.1, opens it in Debian's chromium (no network: every other request is
aborted) and screenshots the Explorer. ``--ablate``: the Explorer in its ablate mode, after a
click on a head's switch in the page (``notebook_template.README_ABLATE``). Not a test: the browser tests use tiny
random models, which make a poor picture.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .conftest import CHROMIUM, CHROMIUM_ARGS, _hermetic, voila_server
from .notebook_template import write_readme_notebook

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--ablate", action="store_true", help="the ablate mode, head 1 of block 2 switched off")
    args = parser.parse_args(argv)
    args.out = args.out or REPO / "docs" / ("explorer_ablate.png" if args.ablate else "explorer.png")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_readme_notebook(folder, ablate=args.ablate)
        with voila_server(folder, "readme.ipynb") as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            context.route("**/*", _hermetic)
            page = context.new_page()
            page.goto(server.url, timeout=240_000)
            page.wait_for_function("() => !!document.querySelector('.vitlens-explorer .js-plotly-plot .main-svg')",
                                   timeout=240_000)
            page.wait_for_timeout(500)  # the ResizeObserver's last relayout
            if args.ablate:  # switch head 1 off in the page, as a user would; wait for the "after" bars
                page.locator(".vitlens-explorer .vitlens-ablate-1").click()
                page.wait_for_function("() => { const gd = document.querySelector('.vitlens-ablate "
                                       ".js-plotly-plot'); return gd && gd.data[1].visible !== false; }",
                                       timeout=240_000)
                page.wait_for_timeout(1000)
            shot = folder / "explorer.png"
            page.locator(".vitlens-explorer").first.screenshot(path=str(shot), animations="disabled")
            browser.close()
        image = Image.open(shot).convert("RGB")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.save(args.out, optimize=True)
        if args.out.stat().st_size > 250_000:  # keep the repository small
            image.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {image.size[0]}×{image.size[1]} px)")
    return args.out


if __name__ == "__main__":
    main()
