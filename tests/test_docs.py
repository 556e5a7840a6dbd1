"""The README and docs/ stand on their own in a clone: no path outside the repository, no external
SPEC, every relative link (and its #anchor) resolves; docs/index.md lists every document; what the
code cites as "docs/method.md §N" exists."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
# Inline Markdown links and images: [text](target) / ![alt](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/work/|(?<![\w.])/home/|(?<![\w.])/tmp/|[A-Za-z]:\\\\")
SPEC = re.compile(r"SPEC\s*§|SPEC\.md|shared/SPEC")


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    out = []
    for ch in text:
        if ch in " -":
            out.append("-")
        elif ch == "_" or unicodedata.category(ch)[0] in "LN":
            out.append(ch)
    return "".join(out)


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(md: Path) -> list[tuple[int, str]]:
    found, in_fence = [], False
    for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            found += [(i, m.group(1)) for m in LINK.finditer(line)]
    return found


def test_slug_follows_githubs_rules() -> None:
    assert slug("5. Reproduction on real photos (CPU scale)") == "5-reproduction-on-real-photos-cpu-scale"
    assert slug("Benchmarks (this machine: 2 CPU cores, no GPU)") == "benchmarks-this-machine-2-cpu-cores-no-gpu"
    assert slug("4.6 Uni-modal retrieval and STS") == "46-uni-modal-retrieval-and-sts"
    assert slug("Synthetic demo (`make demo`, 600 scenes)") == "synthetic-demo-make-demo-600-scenes"


@pytest.mark.parametrize("md", DOCS, ids=_rel)
def test_no_path_outside_the_repository_and_no_external_spec(md: Path) -> None:
    bad = [f"{_rel(md)}:{i}: {line.strip()[:120]}"
           for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1)
           if OUTSIDE.search(line) or SPEC.search(line)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("md", DOCS, ids=_rel)
def test_every_relative_link_and_anchor_resolves_inside_the_repository(md: Path) -> None:
    bad = []
    for line, target in links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        where = f"{_rel(md)}:{line}: {target}"
        if not dest.is_relative_to(REPO):
            bad.append(f"{where} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{where} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{where} (no heading #{frag} in {_rel(dest)})")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_broken_link_an_outside_path_and_a_spec_mention(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("# Title\n\nSee [a](a.md), [b](#title), [c](#nope), [d](https://x.org/y.md).\n"
                  "```\n[not a link](inside-a-fence.md)\n```\nData in ../shared/data; SPEC §4.\n", encoding="utf-8")
    assert links(md) == [(3, "a.md"), (3, "#title"), (3, "#nope"), (3, "https://x.org/y.md")]
    assert anchors(md) == {"title"}
    text = md.read_text(encoding="utf-8")
    assert OUTSIDE.search(text) and SPEC.search(text)
    assert not OUTSIDE.search("see docs/method.md and src/itrkit/work/x.py")


def test_docs_index_lists_every_document() -> None:
    index = REPO / "docs" / "index.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index) if not t.startswith("http")}
    docs = {p.resolve() for p in (REPO / "docs").rglob("*.md") if p != index}
    missing = sorted(_rel(p) for p in docs - listed)
    assert not missing, f"docs/index.md does not list {missing}"


def test_method_md_keeps_the_section_numbering_the_code_cites() -> None:
    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    tops = re.findall(r"^## (\d+)\. (.+)$", text, flags=re.M)
    assert [(int(n), t.split()[0]) for n, t in tops] == [
        (1, "Objectives"), (2, "Models"), (3, "Data"), (4, "Evaluation"), (5, "Reproduction"), (6, "Published")]
    sections = {n for n, _ in tops} | set(re.findall(r"^### (\d+\.\d+) ", text, flags=re.M))
    cited = []
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py"), *DOCS]:
        for m in re.finditer(r"docs/method\.md\s*§\s*(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
            cited.append((_rel(path), m.group(1)))
    assert cited, "nothing cites docs/method.md §N"
    unknown = sorted({(p, s) for p, s in cited if s not in sections})
    assert not unknown, f"cited sections missing from docs/method.md: {unknown}"
    # Every objective and metric key of the library is defined there.
    for key in ("info_nce", "triplet", "teacher_probs", "csa", "usa", "instance", "i2t_R@1", "t2i_R@10", "rsum",
                "i2t_medr", "t2i_meanr", "eccv_i2t_map@r", "eccv_t2i_r1", "f8k_expert_tau_c", "f8k_cf_tau_b",
                "f8k_human_i2t_map@r", "f8k_human_t2i_rp", "CUSA Eq. 6", "IConE Eq. 9"):
        assert key in text, key


def _help_texts() -> list[tuple[str, str]]:
    from itrkit.cli import build_parser

    out: list[tuple[str, str]] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out.append((name, parser.format_help()))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    walk(sp, f"{name} {sub}")

    walk(build_parser(), "itrkit")
    return out


def test_help_texts_reference_only_files_in_the_repository() -> None:
    bad = []
    for name, text in _help_texts():
        for line in text.splitlines():
            if OUTSIDE.search(line) or SPEC.search(line):
                bad.append(f"{name}: {line.strip()}")
            for ref in re.findall(r"\b((?:docs|configs)/[\w./-]+\.\w+)", line):
                if not (REPO / ref).exists():
                    bad.append(f"{name}: {ref} does not exist")
    assert not bad, "\n".join(bad)
