"""Every code block of the documentation runs: the ```python blocks of each page in order, in one
namespace (a page's blocks may build on each other), and each ```bash block is either run by a
named test or listed in NOT_RUN with the reason. The site itself is built, warnings as errors, by
README.md's test command (``mkdocs build --strict``), which .ci/run runs."""
from __future__ import annotations

import pytest

from doc_pages import code_blocks, page, pages

#: ```bash blocks run by a test, by a line they hold -> the test.
RUN_BY = {
    "bpjax predict runs/xor": "tests/test_docs.py::test_the_readme_train_evaluate_predict_commands_run",
    "bpjax explain --seed 0": "tests/test_explain.py::test_the_tutorial_page_shows_what_bpjax_explain_prints",
    "bpjax explain --html explain.html": "tests/test_explain_page.py::test_the_page_steps_through_every_stage_"
                                         "with_the_records_numbers",
    "scripts/examples/explain_screenshot.py": "tests/test_explain_page.py::test_the_screenshot_script_writes_its_png",
}
#: ```bash blocks not run, by a line they hold -> why.
NOT_RUN = {
    'pip install -e ".[train]" && bpjax train': "installs bpjax and trains the main job for about a minute",
    'pip install -e ".[test,docs]"': "the test command itself, which .ci/run runs in a fresh venv",
    "bpjax train --model mlp --epochs 5 --health": "trains on MNIST-1D for 5 epochs; tests/test_health.py runs "
                                                   "--health and --sanity on xor instead",
}

PYTHON_PAGES = [p for p in pages() if code_blocks(page(p), "python")]


@pytest.mark.parametrize("path", PYTHON_PAGES)
def test_the_python_blocks_of_a_page_run(path):
    namespace = {"__name__": "__docs__"}
    for index, code in enumerate(code_blocks(page(path), "python")):
        exec(compile(code, f"{path} python block {index}", "exec"), namespace)


def test_there_are_python_blocks_to_run():
    assert "README.md" in PYTHON_PAGES and len(PYTHON_PAGES) >= 5


@pytest.mark.parametrize("path", pages())
def test_every_bash_block_is_run_or_says_why_not(path):
    for block in code_blocks(page(path), "bash"):
        known = [key for key in (*RUN_BY, *NOT_RUN) if key in block]
        assert len(known) == 1, (f"{path}: a ```bash block neither run by a test (RUN_BY) nor listed "
                                 f"with its reason (NOT_RUN):\n{block}")
