"""The README's first two commands are the ones users and CI run: keep them true. The README is the front door to the
pages under docs/: every one of them is linked from it, and every relative link in the README and in those pages
resolves to a file that exists (and, with a #fragment into a Markdown page, to a heading of that page)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_run_command_runs_this_addon_on_loopback():
    run_command, _ = readme_commands()
    assert "pip install -r requirements.txt" in run_command
    assert "mitmdump -s addon.py --mode reverse:" in run_command
    assert "--listen-host 127.0.0.1" in run_command


def without_fences(markdown: str) -> str:
    return re.sub(r"(?ms)^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", "", markdown)


def prose(markdown: str) -> str:
    """The Markdown without fenced code blocks and inline code (which may wrap, but not cross a blank line): what is
    left of a link there is only text."""
    return re.sub(r"(?s)(`+)(?:(?!\n[ \t]*\n).)+?\1", "", without_fences(markdown))


def links(markdown: str) -> list[str]:
    """Every link and image target: [text](target), [text](<target> "title"), ![alt](target), [ref]: target."""
    text = prose(markdown)
    inline = re.findall(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    references = re.findall(r"(?m)^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text)
    return inline + references


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links as their text, no emphasis or code marks) lower-cased, spaces
    to '-', every other character that is not a letter, a digit, '-' or '_' dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    kept = [c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    for heading in re.findall(r"(?m)^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", without_fences(page.read_text())):
        base = anchor(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
            continue  # https:, mailto: ...: not a file of this repository
        path, _, fragment = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and file.suffix == ".md" and unquote(fragment) not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    return broken


def test_the_link_checker_sees_what_github_renders():
    assert anchor("Streaming (`\"stream\": true`)") == "streaming-stream-true"
    assert anchor("Retry codes: 529 and Cloudflare's 520–523 yes, 524 no") == (
        "retry-codes-529-and-cloudflares-520523-yes-524-no")
    assert anchor("Point SillyTavern at it") == "point-sillytavern-at-it"
    assert anchor("snake_case and [a link](x.md)") == "snake_case-and-a-link"
    sample = 'See [a](docs/a.md#b), ![i](i.png "t"), `[no](code.md)`, [c](https://x.y/z).\n```\n[no](fence.md)\n```\n'
    assert links(sample) == ["docs/a.md#b", "i.png", "https://x.y/z"]


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    broken = {str(page.relative_to(ROOT)): broken_links(page) for page in PAGES}
    assert {page: found for page, found in broken.items() if found} == {}


def test_the_readme_links_every_page_under_docs():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links((ROOT / "README.md").read_text())}
    unlinked = [page.name for page in PAGES[1:] if page not in linked]
    assert unlinked == []
