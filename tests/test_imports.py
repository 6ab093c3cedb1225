"""The package's imports run one way (README's Layout), read from the source with ast.

    files, console → models, losses and data → sharding, checkpoints, metrics, flops → run →
    embedding → whole_video → evaluate, export, prepare, compile → search → plots → train →
    main

A module may import modules of a lower layer, and modules of its own sub-package
(`models/` among themselves, `data/` among themselves); `models/` and `losses` know nothing
of `data/`, and `data/` nothing of them. No import circle, and no import inside a function.
"""

import ast

from tests import helpers

PACKAGE = helpers.REPO / "cmvt_jax"
LAYERS = [
  ["files", "console"],
  ["models", "losses", "data"],
  ["sharding", "checkpoints", "metrics", "flops", "config_overrides"],
  ["run"],
  ["embedding"],
  ["whole_video"],  # streams one long video through embedding's programs
  ["evaluate", "export", "prepare", "compile"],
  ["search"],  # searches what export wrote, with export's model
  ["plots"],
  ["train"],
  ["main"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path) -> str:
  return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imports() -> dict[str, list[tuple[str, int, bool]]]:
  """{module: [(imported cmvt_jax module, line, at top level), ...]} of every module."""
  modules = {module_name(path): path for path in PACKAGE.rglob("*.py") if path.stem != "__init__"}
  found = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text())
    top_level = set(map(id, tree.body))
    edges = []
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmvt_jax"):
        targets = [f"{node.module}.{alias.name}" for alias in node.names]
        targets = [t if t in modules else node.module for t in targets]
      elif isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names if alias.name.startswith("cmvt_jax")]
      else:
        continue
      edges += [(target, node.lineno, id(node) in top_level) for target in targets]
    found[name] = edges
  return found


def layer(module: str) -> str:
  """The layer name of `cmvt_jax.X...`: `X` (the sub-package for models/ and data/)."""
  return module.split(".")[1]


def test_every_module_has_a_layer():
  missing = sorted({layer(module) for module in imports()} - set(RANK))
  assert not missing, f"add these modules to LAYERS (and README's Layout): {missing}"


def test_imports_run_one_way_and_only_at_the_top():
  problems = []
  for module, edges in imports().items():
    for target, line, at_top in edges:
      where = f"{module} line {line} imports {target}"
      if not at_top:
        problems.append(f"{where} inside a function or block")
      source, imported = layer(module), layer(target)
      if source == imported:
        continue
      if RANK[imported] >= RANK[source]:
        problems.append(f"{where}: {imported} is not below {source}")
      elif {source, imported} <= {"models", "losses", "data"}:
        problems.append(f"{where}: models/losses and data must not know each other")
  assert not problems, "\n".join(problems)


def test_no_import_circle():
  graph = {module: {target for target, _, _ in edges} for module, edges in imports().items()}
  state = {}

  def visit(module, trail):
    if state.get(module) == "done":
      return
    if state.get(module) == "open":
      raise AssertionError("import circle: " + " → ".join([*trail, module]))
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      visit(target, [*trail, module])
    state[module] = "done"

  for module in sorted(graph):
    visit(module, [])


def test_the_checks_see_a_circle_and_a_function_level_import(tmp_path, monkeypatch):
  """The checks above can fail: two modules importing each other inside functions."""
  package = tmp_path / "cmvt_jax"
  package.mkdir()
  (package / "run.py").write_text("from cmvt_jax import train\n")
  (package / "train.py").write_text("def f():\n  from cmvt_jax import run\n")
  monkeypatch.setattr(f"{__name__}.PACKAGE", package)
  found = imports()
  assert found["cmvt_jax.train"] == [("cmvt_jax.run", 2, False)]
  assert found["cmvt_jax.run"] == [("cmvt_jax.train", 1, True)]
  try:
    test_no_import_circle()
  except AssertionError as error:
    assert "cmvt_jax.run → cmvt_jax.train → cmvt_jax.run" in str(error)
  else:
    raise AssertionError("the circle went unnoticed")
