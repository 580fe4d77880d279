"""The screenshot of ``bpjax explain --html`` in the docs (docs/images/explain_page.png): the
tutorial's page, opened in headless Chromium through Playwright, stepped to one stage. Run:

    python scripts/examples/explain_screenshot.py --out docs/images/explain_page.png

Needs ``pip install playwright`` and Debian's ``chromium`` (or BPJAX_CHROMIUM=/path/to/chrome).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

import jax

import bpjax as bp
from bpjax.cli.explain import tutorial_problem
from bpjax.explain.page import write_page


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/images/explain_page.png", help="the PNG written")
    p.add_argument("--stage", type=int, default=9, help="the stage shown, counted from 1 (9: backward through "
                                                        "the output's dense layer)")
    p.add_argument("--steps", type=int, default=100, help="steps of gradient descent in the loss curve")
    args = p.parse_args(argv)
    chromium = os.environ.get("BPJAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("explain_screenshot: needs playwright (pip install playwright)", file=sys.stderr)
        return 2
    if chromium is None:
        print("explain_screenshot: needs Chromium (apt-get install chromium, or set BPJAX_CHROMIUM)", file=sys.stderr)
        return 2
    model, loss, x, y = tutorial_problem()
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))       # as bpjax explain's default --seed 0
    rec = bp.explain(model, loss, params, state, x, y, lr=0.5, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        page_path = write_page(rec, pathlib.Path(tmp) / "explain.html")
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(page_path.as_uri())
        for _ in range(args.stage - 1):
            page.click("#next")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"explain_screenshot: wrote {args.out} (stage {args.stage})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
