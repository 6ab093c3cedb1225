"""Explains a refused `--config.KEY=VALUE` override: which key the config file lacks, and
which keys it has there (ml_collections only says KeyError)."""

from __future__ import annotations

import importlib.util

from ml_collections import config_dict


def unknown_key_message(argv: list[str], error: Exception) -> str:
  """Names the first override whose key the config file does not define, and its siblings."""
  config = load_config_file(argv)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0].split(".")
    node = config
    for depth, part in enumerate(path):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(["config", *path[:depth]])
        return (
          f"{arg}: {where} has no key {part!r}; its keys are: {', '.join(keys)}. "
          "Overrides can only set keys that the config file defines."
        )
      node = node[part]
  return f"a --config override names a key that the config does not have ({error})."


def load_config_file(argv: list[str]) -> config_dict.ConfigDict:
  """`get_config()` of the file that `--config` names in `argv`."""
  path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
  if path is None and "--config" in argv:
    path = argv[argv.index("--config") + 1]
  spec = importlib.util.spec_from_file_location("cmvt_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
