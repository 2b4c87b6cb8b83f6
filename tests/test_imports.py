"""The package's imports form layers: no cycles, nothing imports upwards.

Every ``.py`` file of copd_mega/, parallel/ and data/ is parsed with ``ast``; every import of
the package (at module level or inside a function) is an edge. Layers, bottom first:

  config, files               copd_mega.config and its helpers (copd_mega.config_*); run lock, disk full
  parallel, data              process groups and collectives; shards, reader, tokenizer
  report                      metrics, progress display, plots
  models, ckpt                model builders and forward/step; checkpoints
  rl, hf                      rollout, rewards, losses, objective, schedule; HF conversion
  launch                      job set-up: data, validation, memory plan, runtime
  trainer                     the loops: pretrain, train, evaluate; telemetry after a step
  study                       ``copd study``: runs of every mode, the report; the demo's table
  cli, demo                   commands

A module imports only modules of its own package or of a lower layer, the graph has no cycle,
and only ``copd_mega.cli`` (the entry point, cheap to import) imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"copd_mega": ROOT / "copd_mega", "copd_mega.parallel": ROOT / "parallel",
           "copd_mega.data": ROOT / "data"}  # fmt: skip
LAYERS = [
    ["copd_mega", "copd_mega.config", "copd_mega.files"],
    ["copd_mega.parallel", "copd_mega.data"],
    ["copd_mega.report"],
    ["copd_mega.models", "copd_mega.ckpt"],
    ["copd_mega.hf"],
    ["copd_mega.rl"],  # the vLLM engine maps weights to HF names (hf.mapping)
    ["copd_mega.launch"],
    ["copd_mega.trainer"],
    ["copd_mega.study"],
    ["copd_mega.cli", "copd_mega.demo"],
]
LAZY_IMPORTS_ALLOWED = {"copd_mega.cli"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed package."""
    out = {}
    for root, folder in SOURCES.items():
        for p in sorted(folder.rglob("*.py")):
            parts = list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([root, *parts])] = p
    return out


def package_of(module: str) -> str:
    """The layered package a module belongs to (``copd_mega.config_tree`` -> config's)."""
    parts = module.split(".")
    if len(parts) == 1:
        return module
    if parts[1].startswith("config"):
        return "copd_mega.config"
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    pkg = package_of(module)
    for i, names in enumerate(LAYERS):
        if pkg in names:
            return i
    raise AssertionError(f"{module}: its package {pkg} is in no layer; add it to LAYERS")


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each import of the package."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        nested = id(node) not in top_level
        out += [(t, node.lineno, nested) for t in targets if t in known]
    return out


def graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(edges, upward imports, function-level imports) of the package."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    upward, lazy = [], []
    for m, path in mods.items():
        for target, line, nested in imports(m, path, known):
            if target == m:
                continue
            edges[m].add(target)
            same = package_of(target) == package_of(m)
            if not same and layer_of(target) >= layer_of(m):
                upward.append(f"{m}:{line} imports {target} (layer {layer_of(target)} >= "
                              f"{layer_of(m)})")  # fmt: skip
            if nested and m not in LAZY_IMPORTS_ALLOWED:
                lazy.append(f"{m}:{line} imports {target} inside a function")
    return edges, upward, lazy


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_covers_the_package():
    edges, _, _ = graph()
    assert {"copd_mega.cli", "copd_mega.config", "copd_mega.parallel.topology",
            "copd_mega.data.reader", "copd_mega.trainer.train"} <= set(edges)  # fmt: skip
    assert "copd_mega.rl.rollout" in edges["copd_mega.trainer.train"] or any(
        t.startswith("copd_mega.rl.") for t in edges["copd_mega.trainer.train"]
    )
    for m in edges:
        layer_of(m)  # every module has a layer


def test_no_import_cycles():
    edges, _, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_only_import_downwards():
    _, upward, _ = graph()
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_function_level_imports_of_the_package():
    _, _, lazy = graph()
    assert not lazy, "import at module level instead:\n" + "\n".join(lazy)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The cycle finder, the layer rule and the function-level rule each fail on a bad graph."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("copd_mega.parallel.topology") < layer_of("copd_mega.models.gpt")
    assert layer_of("copd_mega.data.reader") < layer_of("copd_mega.trainer.train")
    assert layer_of("copd_mega.config_tree") == layer_of("copd_mega.config") == 0
    src = "import os\n\ndef f():\n    from copd_mega.models import gpt\n"
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    got = imports("copd_mega.parallel.probe", probe, {"copd_mega.models.gpt"})
    assert got == [("copd_mega.models.gpt", 4, True)]
