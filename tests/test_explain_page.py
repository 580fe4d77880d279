"""bpjax explain --html in a real browser (headless Chromium through Playwright): the page loads
nothing from outside itself, steps through every stage of the algorithm, and every number it
shows is the record's; a screenshot is taken. Skipped, saying why, where Chromium or Playwright
is missing, except under .ci/run (BPJAX_REQUIRE_BROWSER=1), which installs them and fails instead.
The browser runs in its own process (tests/explain_browser.py), away from the other tests."""
import json
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

HERE = pathlib.Path(__file__).resolve().parent


def _chromium():
    return os.environ.get("BPJAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium():
    """The Chromium to run, or a skip saying what is missing (a failure under .ci/run)."""
    import importlib.util
    problem = None
    if importlib.util.find_spec("playwright") is None:
        problem = "playwright is not installed (pip install playwright)"
    elif _chromium() is None:
        problem = "no Chromium found (apt-get install chromium, or set BPJAX_CHROMIUM)"
    if problem is not None:
        if os.environ.get("BPJAX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test could not run: {problem}")
        pytest.skip(problem)
    return _chromium()


def _visit(chromium, path, tmp_path) -> dict:
    """What tests/explain_browser.py saw walking the page at ``path``, in its own process."""
    shot = tmp_path / (path.stem + ".png")
    done = subprocess.run([sys.executable, str(HERE / "explain_browser.py"), chromium, str(path), str(shot)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    return json.loads(done.stdout)


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


def _check_walk(seen, rec):
    """Every stage the browser saw against the record."""
    stages = _expected(rec)
    assert seen["counter"] == f"stage 1 of {len(stages)}" and len(seen["stages"]) == len(stages)
    for (words, node, arrays), got in zip(stages, seen["stages"]):
        title = got["title"]
        assert all(w in title for w in words), (title, words)
        assert got["node"] == node, title
        assert sorted(a["name"] for a in got["arrays"]) == sorted(arrays), (title, [a["name"] for a in got["arrays"]])
        for a in got["arrays"]:
            want = np.asarray(arrays[a["name"]], np.float64).ravel()
            np.testing.assert_allclose(a["values"], want, rtol=1e-12, atol=0, err_msg=f"{title}: {a['name']}")
            if a["text"]:                                   # a table: the digits shown are the value's
                np.testing.assert_allclose([float(t) for t in a["text"]], want, rtol=1e-3, atol=1e-12)
            else:                                           # a heat map: one cell per entry
                assert a["heat"] == want.size
    assert seen["counter_after_back"] == f"stage {len(stages) - 1} of {len(stages)}"
    assert all(u.startswith("file://") for u in seen["requests"]), seen["requests"]
    return stages


def test_the_page_steps_through_every_stage_with_the_records_numbers(chromium, tmp_path):
    model, loss, x, y = tutorial_problem()
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))
    rec = bp.explain(model, loss, params, state, x, y, steps=40)
    path = tmp_path / "explain.html"
    assert cli.main(["explain", "--steps", "40", "--html", str(path)]) == 0       # the command the docs show
    source = path.read_text()
    for outside in ('src="http', "href=\"http", "@import", "url(http", "<link"):
        assert outside not in source
    seen = _visit(chromium, path, tmp_path)
    assert seen["nodes"] == len(rec.layers) + 2
    assert seen["curve_points"] == len(rec.losses) == 42
    assert len(_check_walk(seen, rec)) == 2 * len(rec.layers) + 4


def test_larger_arrays_are_heat_maps_with_every_value(chromium, tmp_path):
    model = bp.sequential(bp.dense(12), bp.tanh(), bp.dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (9, 7))
    params, state, _ = model.init(jax.random.PRNGKey(1), (7,))
    rec = bp.explain(model, bp.softmax_cross_entropy(), params, state, x, np.arange(9) % 3, steps=2)
    seen = _visit(chromium, write_page(rec, tmp_path / "heat.html"), tmp_path)
    _check_walk(seen, rec)
    assert any(a["heat"] for st in seen["stages"] for a in st["arrays"])


def test_the_screenshot_script_writes_its_png(chromium, tmp_path):
    out = tmp_path / "explain_page.png"
    script = HERE.parent / "scripts/examples/explain_screenshot.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "5"], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
