"""The documentation's examples run: docstring doctests, the usage blocks of docstrings, and the
README's train → evaluate → predict commands (its Python blocks run in test_scripts.py)."""
from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import re
import shlex

import numpy as np
import pytest

import bpjax
from bpjax import cli

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
    """The README's block that trains XOR, evaluates and predicts, run as written in a temporary
    folder (``inputs.npy`` made first)."""
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "bpjax predict runs/xor" in b]
    monkeypatch.chdir(tmp_path)
    np.save("inputs.npy", np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32))
    for line in block.strip().splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[0] == "bpjax", line
        assert cli.main(argv[1:] + (["--no-progress"] if argv[1] == "train" else [])) == 0, line
    assert np.load("outputs.npy").shape == (4, 2)
    assert "test acc" in capsys.readouterr().out


def _layout_sections(block: str) -> dict:
    """Each folder of the README's layout tree (``bpjax/``, ``bpjax/check/``, ...) -> its lines:
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
    """Every module of bpjax/ and every script is named in the README's layout, under its folder."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[layout.index("```") + 3:]
    sections = _layout_sections(layout[:layout.index("```")])
    files = [p for p in sorted(PACKAGE.rglob("*.py"))
             if p.stem != "__main__" and (p.stem != "__init__" or p.parent == PACKAGE)]
    files += [p for p in sorted((ROOT / "scripts").rglob("*")) if p.suffix in (".py", ".sh")]
    missing = [p.relative_to(ROOT).as_posix() for p in files
               if not re.search(rf"(?<![\w.]){re.escape(p.name)}",
                                sections.get(p.parent.relative_to(ROOT).as_posix() + "/", ""))]
    assert not missing, f"README's layout does not name {missing} under their folders"