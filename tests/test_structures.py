"""docs/structures.md names every module once, and the README leads to it and the other docs
without linking anything outside the repository."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("muxserve", "placement", "scripts")
ENTRY = re.compile(r"^- `([^`]+\.py)`: \S")  # one line per module: "- `path`: what it owns"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # a Markdown link's target


def modules(root: Path = ROOT) -> set[str]:
    return {str(p.relative_to(root)) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}


def listed(text: str) -> Counter[str]:
    return Counter(m.group(1) for line in text.splitlines() if (m := ENTRY.match(line)))


def test_every_module_is_named_once():
    named = listed((ROOT / "docs" / "structures.md").read_text())
    assert sorted(modules() - set(named)) == []  # a new module: add its line
    assert sorted(set(named) - modules()) == []  # a module gone or moved: update its line
    assert [path for path, n in named.items() if n > 1] == []


def test_readme_leads_to_every_doc_and_nowhere_outside():
    readme = (ROOT / "README.md").read_text()
    targets = LINK.findall(readme)
    outside = [t for t in targets if not t.startswith("#") and not (ROOT / t).exists()]
    assert outside == []  # every link is an anchor or a file of this repository
    docs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    assert [d for d in docs if d not in targets] == []


def test_an_entry_is_a_module_path_and_what_it_owns():
    text = "- `muxserve/a.py`: the a\n- `muxserve/b.py`:\n  - `muxserve/c.py`: nested\n- `x.md`: no"
    assert listed(text) == Counter({"muxserve/a.py": 1})
