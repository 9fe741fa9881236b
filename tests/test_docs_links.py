"""Every relative link in README.md and docs/*.md, and every repository path a config mentions, points to a file.

Links: `[text](target)` and `<img src="target">` with a relative target (no scheme, no leading `/`); a
`#fragment` on a Markdown target must name a heading of that file (GitHub's anchor rules). Configs: any
`docs/...`, `configs/...`, `scripts/...`, `benchmarks/...`, `launch/...` or `diffusion_jax/...` path in a
config file's text must exist.
"""

from __future__ import annotations

import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]*\bsrc=\"([^\"]+)\"")
PATH_IN_CONFIG = re.compile(r"(?<![\w/.])((?:docs|configs|scripts|benchmarks|launch|diffusion_jax)/[\w./-]*\w)")


def _strip_code(text: str) -> str:
  """Drops fenced code blocks and inline code spans (a link shown as code is not a link)."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces -> '-', -N for repeats)."""
  anchors, seen = set(), {}
  for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    title = re.sub(r"<[^>]+>", "", m.group(1))
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    slug = "".join(ch for ch in title.lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    slug = slug.replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


def broken_links(md_path: str) -> list[str]:
  """The relative link targets of one Markdown file that do not resolve (missing file or unknown anchor)."""
  with open(md_path, encoding="utf-8") as f:
    text = f.read()
  bad = []
  for m in LINK.finditer(_strip_code(text)):
    target = m.group(1) or m.group(2)
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
      continue  # http(s):, mailto:, an absolute site path: not checked here
    path, _, frag = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(md_path), path)) if path else md_path
    if not os.path.exists(full):
      bad.append(f"{target} (no such file)")
      continue
    if frag and full.endswith(".md"):
      with open(full, encoding="utf-8") as f:
        if frag not in heading_anchors(f.read()):
          bad.append(f"{target} (no heading with anchor #{frag})")
  return bad


def markdown_files() -> list[str]:
  docs = os.path.join(ROOT, "docs")
  return [os.path.join(ROOT, "README.md")] + sorted(
      os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_markdown_links_resolve(md):
  assert broken_links(md) == [], f"broken links in {os.path.relpath(md, ROOT)}"


def config_paths(py_path: str) -> list[str]:
  with open(py_path, encoding="utf-8") as f:
    return sorted(set(PATH_IN_CONFIG.findall(f.read())))


def test_paths_in_configs_exist():
  cfg_dir = os.path.join(ROOT, "configs")
  missing = []
  for name in sorted(os.listdir(cfg_dir)):
    if name.endswith(".py"):
      for p in config_paths(os.path.join(cfg_dir, name)):
        if not os.path.exists(os.path.join(ROOT, p)):
          missing.append(f"configs/{name}: {p}")
  assert missing == []


def test_checker_catches_broken_links(tmp_path):
  """The checks above can fail: a missing file, a missing anchor and a missing config path are reported."""
  (tmp_path / "other.md").write_text("# A title\n\n## Second, part (two)\n")
  page = tmp_path / "page.md"
  page.write_text("[ok](other.md) [ok](other.md#second-part-two) [ok](#local) [web](https://example.org/x)\n"
                  "# Local\n`[code](missing.md)`\n[bad](missing.md) [bad anchor](other.md#nope) "
                  '<img src="images/none.png">\n')
  assert broken_links(str(page)) == ["missing.md (no such file)", "other.md#nope (no heading with anchor #nope)",
                                     "images/none.png (no such file)"]
  cfg = tmp_path / "c.py"
  cfg.write_text('"""See docs/training-and-configs.md and docs/readme/10_training.md."""\n')
  assert config_paths(str(cfg)) == ["docs/readme/10_training.md", "docs/training-and-configs.md"]
