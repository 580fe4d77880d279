"""bpjax explain --html in a real browser (headless Chromium through Playwright): the page loads
nothing from outside itself, steps through every stage of the algorithm, and every number it
shows is the record's; a screenshot is taken. Skipped, saying why, where Chromium or Playwright
is missing, except under .ci/run (BPJAX_REQUIRE_BROWSER=1), which installs them and fails instead."""
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.cli.explain import tutorial_problem
from bpjax.explain.page import write_page


def _chromium():
    return os.environ.get("BPJAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install playwright)"
    if problem is None and _chromium() is None:
        problem = "no Chromium found (apt-get install chromium, or set BPJAX_CHROMIUM)"
    if problem is not None:
        if os.environ.get("BPJAX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test could not run: {problem}")
        pytest.skip(problem)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield b
        b.close()
    _collect_playwrights_transports()


def _collect_playwrights_transports():
    """Collect now the driver's subprocess transports, whose finalizers call into Playwright's
    closed event loop ("Event loop is closed"): left to a later collection, the warning lands on
    whichever test runs then, in another file. Only that error is dropped."""
    import gc

    previous = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
            previous(u)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _expected(rec):
    """(words the title holds, the layer it is at, {array name: values}) for every stage, from the record."""
    label = lambda k: "W" if k == "w" else k
    out = [(("Forward", "input"), "input", {"x": rec.x})]
    for i, s in enumerate(rec.layers):
        out.append((("Forward", s.label), str(i), {**{label(k): a for k, a in s.params.items()}, "y": s.y}))
    out.append((("loss",), "loss", {"y": rec.output, "y′": rec.target, "E": rec.loss}))
    out.append((("error at the output",), "loss", {"∂E/∂y": rec.error}))
    for i in reversed(range(len(rec.layers))):
        s = rec.layers[i]
        arrays = {"dy": s.dy, **{f"∂E/∂{label(k)}": g for k, g in s.grads.items()}}
        if s.dx is not None:
            arrays["dx"] = s.dx
        out.append((("Backward", s.label), str(i), arrays))
    updates = {f"Δ{label(k)} {s.label}": u for s in rec.layers for k, u in s.updates.items()}
    out.append((("updated",), "loss", {**updates, "E after": rec.loss_after}))
    return out


SHOWN = """() => [...document.querySelectorAll('#arrays .array')].map(a => ({
    name: a.dataset.name,
    values: [...a.querySelectorAll('[data-value]')].map(c => Number(c.dataset.value)),
    text: [...a.querySelectorAll('td')].map(c => c.textContent),
    heat: a.querySelectorAll('.heat div').length}))"""


def _walk(page, rec):
    stages = _expected(rec)
    assert page.inner_text("#counter") == f"stage 1 of {len(stages)}"
    for i, (words, node, arrays) in enumerate(stages):
        if i:
            page.click("#next")
        title = page.inner_text("#stage-title")
        assert all(w in title for w in words), (i, title, words)
        assert page.evaluate("() => document.querySelector('.node.active').dataset.index") == node
        shown = page.evaluate(SHOWN)
        assert sorted(a["name"] for a in shown) == sorted(arrays), (title, [a["name"] for a in shown])
        for a in shown:
            want = np.asarray(arrays[a["name"]], np.float64).ravel()
            np.testing.assert_allclose(a["values"], want, rtol=1e-12, atol=0, err_msg=f"{title}: {a['name']}")
            if a["text"]:                                   # a table: the digits shown are the value's
                np.testing.assert_allclose([float(t) for t in a["text"]], want, rtol=1e-3, atol=1e-12)
            else:                                           # a heat map: one cell per entry
                assert a["heat"] == want.size
    assert page.is_disabled("#next")
    page.keyboard.press("ArrowLeft")
    assert page.inner_text("#counter") == f"stage {len(stages) - 1} of {len(stages)}"
    return stages


def test_the_page_steps_through_every_stage_with_the_records_numbers(browser, tmp_path):
    model, loss, x, y = tutorial_problem()
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))
    rec = bp.explain(model, loss, params, state, x, y, steps=40)
    path = tmp_path / "explain.html"
    assert cli.main(["explain", "--steps", "40", "--html", str(path)]) == 0       # the command the docs show
    source = path.read_text()
    for outside in ('src="http', "href=\"http", "@import", "url(http", "<link"):
        assert outside not in source
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    assert page.locator(".node").count() == len(rec.layers) + 2
    points = page.get_attribute("#loss-curve polyline", "points").split()
    assert len(points) == len(rec.losses) == 42
    stages = _walk(page, rec)
    assert len(stages) == 2 * len(rec.layers) + 4
    assert all(u.startswith("file://") for u in requests), requests
    shot = tmp_path / "explain.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_larger_arrays_are_heat_maps_with_every_value(browser, tmp_path):
    model = bp.sequential(bp.dense(12), bp.tanh(), bp.dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (9, 7))
    params, state, _ = model.init(jax.random.PRNGKey(1), (7,))
    rec = bp.explain(model, bp.softmax_cross_entropy(), params, state, x, np.arange(9) % 3, steps=2)
    page = browser.new_page()
    page.goto(write_page(rec, tmp_path / "heat.html").as_uri())
    _walk(page, rec)


def test_the_screenshot_script_writes_its_png(browser, tmp_path):
    """In its own process: one process runs one Playwright at a time, and the fixture's is open."""
    out = tmp_path / "explain_page.png"
    script = pathlib.Path(__file__).parents[1] / "scripts/examples/explain_screenshot.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "5"], check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
