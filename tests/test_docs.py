"""The documentation's examples run: docstring doctests, the usage blocks of docstrings, and the
pages' train → evaluate → predict commands and the sections other tests read (the README and the
site under docs/; the pages' Python blocks run in test_site.py)."""
from __future__ import annotations

import ast
import doctest
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import bpjax
from bpjax import cli
from doc_pages import code_blocks, file_block, page

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bpjax"
MODULES = sorted(".".join(("bpjax",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.stem != "__main__")
USES_BPJAX = re.compile(r"\b(bpjax|bp|train|runs)\.[a-z_]+\(")

#: Usage blocks (``::`` literal blocks written as Python that call bpjax), by where they sit,
#: each run by a test here or next to its module's tests.
TESTED_BLOCKS = {
    "bpjax.train.runs": "test_the_runs_module_example_loads_a_trained_model",
    "bpjax.train": "tests/test_train.py::test_the_module_docstring_example_runs",
}


def _docstrings(module):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "name", module.__name__), doc


def _literal_blocks(doc: str):
    """The ``::`` literal blocks of a docstring, dedented."""
    for block in re.findall(r"::\n\n((?:[ \t]+.*\n|\n)+)", doc + "\n"):
        lines = [line for line in block.splitlines()]
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        yield "\n".join(line[indent:] for line in lines).strip() + "\n"


def _python_usage_blocks(module):
    """Literal blocks that parse as Python and call into bpjax: examples a reader will copy."""
    for name, doc in _docstrings(module):
        for block in _literal_blocks(doc):
            try:
                ast.parse(block)
            except SyntaxError:
                continue                      # an equation, a file listing, ...
            if USES_BPJAX.search(block):
                yield name, block


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"


def test_there_are_doctests_to_run():
    """The doctest run above is not empty (value_and_grad's example, at least)."""
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples >= 5


def test_every_usage_block_in_a_docstring_is_run_by_a_test():
    found = {name: [where for where, _ in _python_usage_blocks(importlib.import_module(name))] for name in MODULES}
    untested = {name: where for name, where in found.items() if where and name not in TESTED_BLOCKS}
    assert not untested, (f"docstring usage examples no test runs: {untested}; write them as doctests "
                          "(>>>) or run them from a test and list them in TESTED_BLOCKS")
    assert all(found[name] for name in TESTED_BLOCKS), "a listed example is gone: update TESTED_BLOCKS"


@pytest.fixture(scope="module")
def xor_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "run"
    assert cli.main(["train", "--dataset", "xor", "--epochs", "3", "--out", str(out), "--no-progress",
                     "--no-plot"]) == 0
    return out


def test_the_runs_module_example_loads_a_trained_model(xor_run):
    (block,) = [b for _, b in _python_usage_blocks(bpjax.train.runs)]
    code = block.replace('"runs/resnet1d-mnist1d-s0"', repr(str(xor_run)))
    namespace = {"bpjax": bpjax, "x": np.zeros((7, 2), np.float32)}
    exec(compile(code, "bpjax.train.runs docstring", "exec"), namespace)
    assert namespace["y"].shape == (7, 2)


def test_the_readme_train_evaluate_predict_commands_run(tmp_path, monkeypatch, capsys):
    """The how-to's block (docs/how-to/runs.md) that trains XOR, evaluates and predicts, run as
    written in an empty temporary folder: the block makes its own ``inputs.npy``."""
    (block,) = [b for b in code_blocks(page("docs/how-to/runs.md"), "bash") if "bpjax predict runs/xor" in b]
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = shlex.split(line) if line.startswith("python") else shlex.split(line.split("#")[0])
        if argv[:2] == ["python", "-c"]:
            exec(compile(argv[2], "docs/how-to/runs.md python -c", "exec"), {})
            continue
        assert argv[0] == "bpjax", line
        assert cli.main(argv[1:] + (["--no-progress"] if argv[1] == "train" else [])) == 0, line
    assert np.load("outputs.npy").shape == (4, 2)
    assert "test acc" in capsys.readouterr().out


def test_the_readme_gradcheck_examples_print_what_it_shows(tmp_path, monkeypatch, capsys):
    """``mypkg/layers.py`` and ``mypkg/ops.py`` as the tutorials show them (docs/tutorials/own-layer.md,
    check-vjp.md), checked by the commands they show: the layer's table and summary line as printed
    (the time aside), the function's pass."""
    readme = page("docs/tutorials/own-layer.md")
    (tmp_path / "mypkg").mkdir()
    for name in ("layers", "ops"):
        (tmp_path / "mypkg" / f"{name}.py").write_text(file_block(f"mypkg/{name}.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    shown = re.search(r"--in-shape 4`\nprints \(exit status 1\):\n\n```\n(.*?)```", readme, re.S).group(1)
    untimed = lambda text: re.sub(r"\(\d+\.\d s\)", "(… s)", text).strip()      # noqa: E731
    try:
        assert cli.main(["gradcheck", "mypkg.layers:scale", "--in-shape", "4"]) == 1
        assert untimed(capsys.readouterr().out) == untimed(shown)
        assert cli.main(["gradcheck", "mypkg.ops:softplus", "--args-shapes", "3,4",
                         "--reference", "mypkg.ops:plain_softplus"]) == 0
        assert capsys.readouterr().out.rstrip().rsplit("\n", 1)[-1].startswith(
            "bpjax gradcheck: 1 check in float64, all 1 passed")
    finally:
        for m in ("mypkg", "mypkg.layers", "mypkg.ops"):
            sys.modules.pop(m, None)


def test_the_readme_lists_every_model_and_dataset():
    """``bpjax train --help lists the models (...) and datasets (...)``: all that the command
    trains on (gru was missing)."""
    from bpjax.datasets import DATASETS
    from bpjax.models import MODELS

    readme = page("docs/how-to/runs.md")
    models, datasets = re.search(r"`bpjax train --help` lists the models \((.*?)\)\s+and datasets \((.*?)\)",
                                 readme, re.S).groups()
    assert sorted(re.findall(r"`(\w+)`", models)) == sorted(MODELS)
    assert sorted(re.findall(r"`(\w+)`", datasets)) == sorted(DATASETS)


def _layout_sections(block: str) -> dict:
    """Each folder of the layout tree (docs/layout.md) (``bpjax/``, ``bpjax/check/``, ...) -> its lines:
    the folder's own line and every line indented deeper below it."""
    lines, sections, stack = block.splitlines(), {}, []
    for i, line in enumerate(lines):
        m = re.match(r"( *)([\w.]+/)(\s|$)", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + m.group(2)
        stack.append((indent, path))
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
        sections[path] = "\n".join(lines[i:end])
    return sections


def test_the_readme_layout_names_every_module_and_script():
    """Every module of bpjax/ and every script is named in the layout (docs/layout.md), under its folder."""
    readme = page("docs/layout.md")
    layout = readme[readme.index("# Layout"):]
    layout = layout[layout.index("```") + 3:]
    sections = _layout_sections(layout[:layout.index("```")])
    files = [p for p in sorted(PACKAGE.rglob("*.py"))
             if p.stem != "__main__" and (p.stem != "__init__" or p.parent == PACKAGE)]
    files += [p for p in sorted((ROOT / "scripts").rglob("*")) if p.suffix in (".py", ".sh")]
    missing = [p.relative_to(ROOT).as_posix() for p in files
               if not re.search(rf"(?<![\w.]){re.escape(p.name)}",
                                sections.get(p.parent.relative_to(ROOT).as_posix() + "/", ""))]
    assert not missing, f"docs/layout.md does not name {missing} under their folders"

def test_the_troubleshooting_names_a_clone_imported_as_a_namespace(tmp_path):
    """A script run from the parent of a clone folder named ``bpjax`` imports the clone as a
    namespace package: the error is Python's, so the troubleshooting (docs/getting-started.md) names it (a root
    ``__init__.py`` that raised would be imported by pytest, which makes a package of a folder
    that has one)."""
    (tmp_path / "bpjax").symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import bpjax; bpjax.sequential"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    error = done.stderr.strip().splitlines()[-1]
    assert error == "AttributeError: module 'bpjax' has no attribute 'sequential'"
    troubleshooting = page("docs/getting-started.md").split("**Troubleshooting.**")[1].split("\n\n")[0]
    assert error.split(": ", 1)[1] in " ".join(troubleshooting.split()) and "rename the" in troubleshooting


def test_the_readme_gives_figures_that_vary_as_a_range_with_their_procedure():
    """The main job's figures depend on the machine (a user got 98.8% / 24 s / epoch 16 against the
    pages' 98.6% / 38 s / epoch 22): docs/getting-started.md says so and gives the range seen over
    seeds; and the CNN's three figures (88.2%, 91.9%, 94.1%) each name the procedure they come from
    (docs/how-to/runs.md)."""
    readme = page("docs/getting-started.md")
    main_job = " ".join(readme.split("two commands")[1].split("<!-- main-command -->")[0].split())
    assert "depend on the machine" in main_job
    assert re.search(r"seeds 0, 1 and 2 reached [\d.]+%, [\d.]+% and [\d.]+%", main_job)
    assert re.search(r"expect \d+\.\d–\d+\.\d%", main_job)
    cnn = " ".join(page("docs/how-to/runs.md").split("The CNN's figures come from three procedures")[1].split("\n\n")[0].split())
    for figure, procedure in (("88.2%", "`bpjax train --model cnn`"), ("91.9% ± 1.8", "`mnist1d_table.py`"),
                              ("94.1% ± 0.6", "`paper_cnn.py`")):
        assert figure in cnn and procedure in cnn, (figure, procedure)
