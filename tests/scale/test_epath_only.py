"""Every file access in cmvt_jax goes through `etils.epath`, so workdirs and data may be gs://.

An AST scan of the package for the ways of touching a path that only work on local disks
(builtin `open`, `os.path`, `os` file calls, `shutil`, `glob`, `pathlib`, numpy's and PyAV's
path arguments). The few that are right stay in ALLOWED, each with its reason; anything new
fails this test with its file, function and line.
"""

import ast

from tests import helpers

PACKAGE = helpers.REPO / "cmvt_jax"
OS_FILE_CALLS = {
  "makedirs",
  "mkdir",
  "remove",
  "unlink",
  "rename",
  "replace",
  "listdir",
  "scandir",
  "walk",
  "rmdir",
  "stat",
  "chdir",
  "removedirs",
}
PATH_MODULES = {"shutil", "glob", "pathlib"}
# Calls that take a path or a file object: fine on a file object from `epath.Path.open`.
FILE_OR_PATH_CALLS = {
  "np.load",
  "np.save",
  "np.savez",
  "np.savez_compressed",
  "np.fromfile",
  "np.memmap",
  "av.open",
}

# (module, enclosing function, call): why a local path is right there.
ALLOWED = {
  (
    "data/video_io.py",
    "VideoStream.__enter__",
    "av.open",
  ): "opens the file object of epath.Path.open, kept open while the stream decodes",
  (
    "search.py",
    "_open_array",
    "np.load",
  ): "memory-maps a local cache file (an object store's is read through epath.Path.open)",
  ("whole_video.py", "memory_available", "open"): "reads /proc/meminfo, not a user's path",
  (
    "search.py",
    "_part_stamp",
    "os.stat",
  ): "a local part's modification time in ns (epath's stat has float seconds); object stores "
  "go through epath.Path.stat",
  (
    "data/dataset_writer.py",
    "_decode_file",
    "os.path.join",
  ): "decoded clips spill into a local temporary folder (tempfile)",
  (
    "data/dataset_writer.py",
    "_ClipFolderBuilder._generate_examples",
    "np.load",
  ): "reads the local spill file back",
  (
    "data/dataset_writer.py",
    "write_dataset",
    "os.path.join",
  ): "TFDS's download folder inside the local scratch folder",
  (
    "data/parts.py",
    "prepare_part",
    "os.path.join",
  ): "the worker's local scratch dataset (ArrayRecord needs POSIX paths), copied up by epath",
  (
    "data/datasets.py",
    "default_data_dir",
    "os.path.join",
  ): "builds the default cache folder from $HOME; the result is an epath",
  ("data/datasets.py", "default_data_dir", "os.path.expanduser"): "likewise",
  (
    "data/synthetic.py",
    "write_mp4",
    "av.open",
  ): "PyAV encodes into a local file (the default dataset is generated in a local "
  "temporary folder, then prepared into data_dir through epath)",
}


class _Scanner(ast.NodeVisitor):
  """Collects (function, call, line) of the path-only calls of one module."""

  def __init__(self):
    self.found = []
    self._scope = []
    self._file_objects = set()  # names bound by `with <x>.open(...) as name`

  def visit_FunctionDef(self, node):
    self._scope.append(node.name)
    self.generic_visit(node)
    self._scope.pop()

  visit_AsyncFunctionDef = visit_FunctionDef
  visit_ClassDef = visit_FunctionDef

  def visit_With(self, node):
    for item in node.items:
      call = item.context_expr
      if (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "open"
        and isinstance(item.optional_vars, ast.Name)
      ):
        self._file_objects.add(item.optional_vars.id)
    self.generic_visit(node)

  def visit_Call(self, node):
    name = _dotted(node.func)
    if name and self._is_path_call(name, node):
      self.found.append((".".join(self._scope) or "<module>", name, node.lineno))
    self.generic_visit(node)

  def _is_path_call(self, name: str, node: ast.Call) -> bool:
    parts = name.split(".")
    if name == "open" or name.startswith("os.path."):
      return True
    if parts[0] == "os" and len(parts) == 2 and parts[1] in OS_FILE_CALLS:
      return True
    if parts[0] in PATH_MODULES:
      return True
    if name in FILE_OR_PATH_CALLS:
      first = node.args[0] if node.args else None
      return not (isinstance(first, ast.Name) and first.id in self._file_objects)
    return False


def _dotted(node) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f"{base}.{node.attr}" if base else None
  return None


def path_calls() -> dict[tuple[str, str, str], list[int]]:
  """{(module, function, call): [lines]} over the whole package."""
  calls = {}
  for module in sorted(PACKAGE.rglob("*.py")):
    scanner = _Scanner()
    scanner.visit(ast.parse(module.read_text(), filename=str(module)))
    relative = module.relative_to(PACKAGE).as_posix()
    for function, call, line in scanner.found:
      calls.setdefault((relative, function, call), []).append(line)
  return calls


def test_no_module_touches_a_path_without_epath():
  unexpected = {key: lines for key, lines in path_calls().items() if key not in ALLOWED}
  assert not unexpected, (
    "Use etils.epath for these (or add a justified entry to ALLOWED):\n"
    + "\n".join(
      f"  cmvt_jax/{module}:{lines} in {function}: {call}(...)"
      for (module, function, call), lines in sorted(unexpected.items())
    )
  )


def test_every_allowed_entry_is_still_needed():
  found = path_calls()
  stale = sorted(key for key in ALLOWED if key not in found)
  assert not stale, f"ALLOWED entries that match no call any more (remove them): {stale}"


def test_the_scan_catches_what_it_is_for(tmp_path):
  source = (
    "import os, shutil\nimport numpy as np\nfrom etils import epath\n"
    "def write(workdir):\n"
    "  open(os.path.join(workdir, 'metrics.jsonl'), 'a')\n"
    "  shutil.copy(workdir, '/tmp')\n"
    "  np.save(workdir + '/x.npy', 1)\n"
    "  with epath.Path(workdir).open('rb') as f:\n"
    "    np.load(f)\n"
  )
  scanner = _Scanner()
  scanner.visit(ast.parse(source))
  assert [call for _, call, _ in scanner.found] == [
    "open",
    "os.path.join",
    "shutil.copy",
    "np.save",
  ]
