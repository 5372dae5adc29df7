"""The library does not reach up into its entry points or tools.

`mhc_jax.tools` (developer tools, benchmarks, experiment runners) and `mhc_jax.cli` (the command line)
sit on top of the library: they import it, never the other way round. The entry points `mhc_jax/cli.py`,
`mhc_jax/__main__.py` and `mhc_jax/quant/cli.py`, and the tools themselves, are exempt. Every import is
read from the source with `ast` (also the ones inside functions), so nothing is executed.
"""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "mhc_jax"
UPPER = ("mhc_jax.tools", "mhc_jax.cli")
ENTRY_POINTS = {"cli.py", "__main__.py", "quant/cli.py"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
  """`(line, module)` of every import in `path`, relative imports resolved; `from a import b` yields
  both `a` and `a.b` (b may be a submodule)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = _module_name(path)
  if path.name != "__init__.py":
    package = package.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      out.append((node.lineno, base))
      out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)):
      out.append((node.lineno, node.args[0].value))    # importlib.import_module("mhc_jax....")
  return out


def library_modules() -> list[pathlib.Path]:
  files = []
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG).as_posix()
    if rel.startswith("tools/") or rel in ENTRY_POINTS:
      continue
    files.append(path)
  return files


def _is_upper(module: str) -> bool:
  return any(module == u or module.startswith(u + ".") for u in UPPER)


def test_library_never_imports_tools_or_cli():
  files = library_modules()
  assert len(files) > 30 and PKG / "train" / "loop.py" in files
  bad = [f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
         for p in files for line, mod in imported_modules(p) if _is_upper(mod)]
  assert not bad, "library modules import the tools / the command line:\n" + "\n".join(bad)


def test_the_check_sees_every_import_form(tmp_path):
  pkg = tmp_path / "mhc_jax" / "sub"
  pkg.mkdir(parents=True)
  src = pkg / "mod.py"
  src.write_text("import mhc_jax.tools.hlo\n"
                 "def f():\n"
                 "  from mhc_jax import cli\n"
                 "  from ..tools import plots\n"
                 "  import importlib\n"
                 "  importlib.import_module('mhc_jax.tools.bench_step')\n")
  global PKG
  saved, PKG = PKG, tmp_path / "mhc_jax"
  try:
    mods = [m for _, m in imported_modules(src) if _is_upper(m)]
  finally:
    PKG = saved
  assert sorted(mods) == ["mhc_jax.cli", "mhc_jax.tools", "mhc_jax.tools.bench_step",
                         "mhc_jax.tools.hlo", "mhc_jax.tools.plots"], mods
