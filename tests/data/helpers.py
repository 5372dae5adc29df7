"""Tiny generated corpora for the data tests: every file's text is unique and recognisable."""
import os


def file_text(i: int, lines: int = 20) -> str:
  return "".join(f"file {i:03d} line {j:02d}: {'xyz' * (j % 4)}\n" for j in range(lines))


def write_corpus(root, n_files: int = 12, lines: int = 20, sub: bool = True) -> list[str]:
  """`n_files` text files under `root` (some in a subdirectory); returns their relative paths."""
  rels = []
  for i in range(n_files):
    rel = os.path.join("sub", f"f{i:03d}.txt") if (sub and i % 3 == 0) else f"f{i:03d}.txt"
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(file_text(i, lines))
    rels.append(rel)
  return sorted(rels)
