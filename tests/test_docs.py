"""The text the project ships is true: DESIGN.md exists and every section cited
as ``DESIGN.md §N`` is in it; every relative link in README.md and DESIGN.md
resolves; every number the README quotes about the shipped data comes from the
code; the README's runnable snippets run as written."""
import math
import os
import re
import subprocess
import sys

import pytest

from simpar.data import CharTokenizer, load_corpus
from tests.mpi_util import ROOT

DOCS = ("README.md", "DESIGN.md")
CITE = re.compile(r"DESIGN(?:\.md)?\s*§\s*(\d+)")


def _repository_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.stdout.splitlines()
            if f.endswith((".py", ".md", ".ipynb", ".cfg", ".toml", ".txt")) and (ROOT / f).is_file()]


def _sections() -> dict:
    """``{number: title}`` of DESIGN.md's ``## N. Title`` headings."""
    text = (ROOT / "DESIGN.md").read_text(encoding="utf-8")
    return {int(n): t for n, t in re.findall(r"^## (\d+)\. (.+)$", text, re.M)}


def _slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return s.replace(" ", "-")


def test_design_sections_are_numbered_in_order():
    numbers = list(_sections())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 6


def test_every_cited_design_section_exists():
    sections = _sections()
    cited = {}
    for path in _repository_files():
        for n in CITE.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(int(n), []).append(path.relative_to(ROOT).as_posix())
    assert cited, "no DESIGN.md § citation found: the pattern is wrong"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"cited but not in DESIGN.md: {missing}"


def test_design_md_is_referenced_only_where_it_exists():
    """No file refers to a DESIGN.md outside the repository root's."""
    for path in _repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"[\w./-]*DESIGN\.md", text):
            assert m.group(0) in ("DESIGN.md",), (path, m.group(0))


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)           # not inside code blocks
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    assert links, f"{doc}: no links found"
    anchors = {d: {_slug(t) for t in re.findall(r"^#+ (.+)$",
                                                 (ROOT / d).read_text(encoding="utf-8"), re.M)}
               for d in DOCS}
    for link in links:
        if re.match(r"^[a-z]+:", link):                       # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (ROOT / doc).parent / target if target else ROOT / doc
        assert path.exists(), f"{doc}: link {link!r} does not resolve"
        if anchor and path.name in anchors:
            assert anchor in anchors[path.name], f"{doc}: no heading for anchor {link!r}"


# ---------------------------------------------------------- numbers about the data
def _claims(text: str) -> list:
    """(kind, value) of every statement about the shipped data."""
    found = []
    found += [("vocab", int(v)) for v in re.findall(r"ln (\d+) [≈~]", text)]
    found += [("ln", (v, x)) for v, x in re.findall(r"ln (\d+) [≈~] (\d+\.\d+)", text)]
    found += [("vocab", int(v)) for v in re.findall(r"vocabulary (?:of )?(\d+)\b", text)]
    found += [("vocab", int(v)) for v in re.findall(r"(\d+)[- ]character vocabulary", text)]
    found += [("vocab", int(v)) for v in re.findall(r"vocabulary of (\d+) characters", text)]
    found += [("chars", int(v.replace(" ", "").replace(",", "")))
              for v in re.findall(r"(\d{1,3}(?:[ ,]\d{3})+) (?:ASCII )?characters", text)]
    return found


@pytest.mark.parametrize("doc", DOCS + ("simpar/demos/tensor_parallel.py", "simpar/train.py"))
def test_numbers_about_the_shipped_data_come_from_the_code(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    corpus = load_corpus()
    vocab = CharTokenizer(corpus).vocab_size
    claims = _claims(text)
    if doc != "simpar/demos/tensor_parallel.py":
        assert claims, f"{doc}: no statement about the data found (pattern out of date?)"
    for kind, value in claims:
        if kind == "vocab":
            assert value == vocab, f"{doc} says a vocabulary of {value}; the tokenizer has {vocab}"
        elif kind == "ln":
            n, x = value
            assert int(n) == vocab and float(x) == round(math.log(vocab), len(x.split(".")[1])), \
                f"{doc} says ln {n} = {x}; ln {vocab} = {math.log(vocab):.4f}"
        elif kind == "chars":
            assert value == len(corpus), f"{doc} says {value} characters; the corpus has {len(corpus)}"
    assert "65-character" not in text and "65 characters" not in text


def test_the_claim_patterns_catch_a_wrong_number():
    assert ("vocab", 65) in _claims("the shipped corpus' 65-character vocabulary")
    assert ("vocab", 65) in _claims("loss from ln 65 ≈ 4.17")
    assert ("chars", 200284) in _claims("200 284 ASCII characters")


# ------------------------------------------------------------ runnable snippets
def _snippets() -> list:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- runnable -->\n```python\n(.*?)```", text, re.S)


def test_readme_marks_its_snippets_runnable():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(_snippets()) == text.count("```python") >= 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs_as_written(index, tmp_path):
    code = _snippets()[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("PMI_SIZE", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, f"README snippet {index} failed:\n{code}\n{res.stderr}"


def test_package_docstrings_announce_only_what_exists():
    import importlib

    import simpar.parallel
    doc = simpar.parallel.__doc__
    for name in re.findall(r":mod:`\.(\w+)`", doc):
        importlib.import_module(f"simpar.parallel.{name}")
    if "ZeRO" in doc:                                   # only once a ZeRO optimizer ships
        assert any(importlib.util.find_spec(f"simpar.parallel.{m}") for m in ("zero", "zero1"))
