"""The documentation site and the README: `mkdocs build --strict` passes, and every ```python block runs.

Code blocks of one page run in order in one namespace (one subprocess per page, JAX on the CPU). A
block that cannot run anywhere but on special hardware is marked on the line before its fence with
`<!-- skip-test: why -->`; the reason is required.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(\S.*?)\s*-->\s*$")


def pages() -> list[pathlib.Path]:
  """README.md and every page of the site (the results/files link holds no pages)."""
  found = [p for p in DOCS.rglob("*.md") if "files" not in p.relative_to(DOCS).parts]
  return [README] + sorted(found)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
  """`(line, code, skip_reason)` of every ```python block of `path`, in order."""
  lines = path.read_text(encoding="utf-8").split("\n")
  blocks, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, lang, start = m.group(1), m.group(2), i
    i += 1
    body = []
    while i < len(lines) and not (FENCE.match(lines[i]) and FENCE.match(lines[i]).group(2) == ""):
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
      i += 1
    i += 1
    if lang == "python":
      prev = lines[start - 1] if start else ""
      skip = SKIP.match(prev)
      if "skip-test" in prev and not skip:
        raise AssertionError(f"{path}:{start}: a skip-test comment needs a reason: <!-- skip-test: why -->")
      blocks.append((start + 1, "\n".join(body) + "\n", skip.group(1) if skip else None))
  return blocks


def _id(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


RUNNABLE = [p for p in pages() if any(r is None for _, _, r in python_blocks(p))]


def test_readme_is_short_and_keeps_the_quick_start():
  text = README.read_text(encoding="utf-8")
  assert len(text.split("\n")) <= 201, "README.md must stay at most 200 lines; move detail into docs/"
  quick = ("```bash\n"
           "make train   # creates .venv from a Python >= 3.12, installs, trains a small 4-stream mHC LM "
           "on the built-in corpus\n"
           "make test    # creates .venv, installs, runs the whole test suite\n"
           "```")
  assert quick in text
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  missing = [l for l in links if "://" not in l and not (ROOT / l).exists()]
  assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_page_with_python_has_runnable_blocks():
  """The pages that show Python run it (at least README and the API pages)."""
  names = {_id(p) for p in RUNNABLE}
  for must in ("README.md", "docs/functional-api.md", "docs/modules.md", "docs/data.md"):
    assert must in names, f"{must} has no runnable ```python block"


@pytest.mark.parametrize("page", RUNNABLE, ids=_id)
def test_python_blocks_run(page: pathlib.Path, tmp_path):
  parts = []
  for line, code, skip in python_blocks(page):
    if skip is None:
      parts.append(f"# --- {_id(page)}:{line}\n{code}")
  script = tmp_path / "blocks.py"
  script.write_text("\n".join(parts), encoding="utf-8")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             MHC_JAX_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, (f"the ```python blocks of {_id(page)} failed:\n"
                                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def test_mkdocs_build_strict(tmp_path):
  pytest.importorskip("mkdocs", reason="the docs extra (mkdocs-material, mkdocstrings) is not installed")
  pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
  pytest.importorskip("mkdocstrings", reason="the docs extra (mkdocstrings[python]) is not installed")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                         "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  assert (tmp_path / "site" / "index.html").is_file()
  assert (tmp_path / "site" / "concepts" / "index.html").is_file()


DOTTED = re.compile(r"\bmhc_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATHS = re.compile(r"(?<![/~\w.])(?:mhc_jax|tests|notebooks|experiments)/[A-Za-z0-9_./-]*[A-Za-z0-9_]")
RESOLVE = r'''
import importlib, sys
bad = []
for ref in sys.argv[1:]:
  parts = ref.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
      break
    except ModuleNotFoundError:
      continue
  else:
    bad.append(ref)
    continue
  for name in parts[i:]:
    if hasattr(obj, name):
      obj = getattr(obj, name)
      continue
    try:
      obj = importlib.import_module(obj.__name__ + "." + name)
    except Exception:
      bad.append(ref)
      break
print("\n".join(bad))
'''


def test_named_modules_and_paths_exist(tmp_path):
  """Every `mhc_jax.x.y` the pages name resolves, and every repository path they name exists."""
  names, paths = set(), set()
  for page in pages():
    text = page.read_text(encoding="utf-8")
    names.update(DOTTED.findall(text))
    for p in PATHS.findall(text):
      # results are written by the commands; dot-folders (venvs, caches) by the tests
      if not p.startswith("experiments/results/") and "/." not in p:
        paths.add(p)
  missing = sorted(p for p in paths if not any((ROOT / (p + ext)).exists() for ext in ("", ".ipynb")))
  assert not missing, f"pages name repository paths that do not exist: {missing}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", RESOLVE, *sorted(names)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  bad = proc.stdout.split()
  assert not bad, f"pages name modules or attributes that do not exist: {bad}"
