"""
The documentation stands alone: every link in README.md and docs/ resolves to a file inside
the repository, and docs/api.md has a section for exactly the operations docs/openapi.yaml
lists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Inline links and images, [text](target), and reference definitions, [name]: target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
OPERATION = re.compile(r"^### `(GET|PUT|POST|DELETE|PATCH) ([^`\s]+)`", re.M)


def links(text: str) -> list[str]:
    # Code blocks and inline code show commands and JSON, not links.
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) or m.group(2) for m in LINK.finditer(text)]


def broken_links(doc: Path) -> list[str]:
    """The links of C{doc} that do not name a file or directory inside the repository."""
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            broken.append(target)  # a URL or an absolute path: outside the repository
            continue
        if not path:
            continue  # an anchor in the same file
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_link_check_catches_links_that_leave_the_repository(tmp_path: Path) -> None:
    text = "[a](../../shared/DESIGN.md) [b](https://example.com) [c](api.md) [d](missing.md#x) `[e](nowhere)`"
    found = [t for t in links(text)]
    assert found == ["../../shared/DESIGN.md", "https://example.com", "api.md", "missing.md#x"]
    probe = tmp_path / "probe.md"
    probe.write_text(text)
    assert broken_links(probe) == found  # from outside the repository, every one of them leaves it


def test_the_readme_and_docs_have_the_pages_they_promise() -> None:
    for name in ("api.md", "cli.md", "client.md"):
        assert (ROOT / "docs" / name).exists()
    assert "../shared" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_api_md_documents_exactly_the_operations_of_the_openapi_spec() -> None:
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8"))
    in_spec = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    }
    in_doc = set(OPERATION.findall((ROOT / "docs" / "api.md").read_text(encoding="utf-8")))
    assert sorted(in_spec - in_doc) == [], "in openapi.yaml, not in api.md"
    assert sorted(in_doc - in_spec) == [], "in api.md, not in openapi.yaml"


def test_the_architecture_page_names_every_module_and_only_modules_that_exist() -> None:
    """docs/architecture.md is the newcomer's map: it must match the tree, both ways."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(kvd/[\w/]+(?:\.py|/))`", text))
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "kvd").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "ui"
    }
    modules = {m if not m.endswith("ui/__init__.py") else "kvd/ui/" for m in modules}
    assert sorted(modules - named) == [], "modules the page does not name"
    assert sorted(n for n in named if not (ROOT / n).exists()) == [], "names the page has that the tree has not"
