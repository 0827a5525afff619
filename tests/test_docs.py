"""The documentation: the site builds strictly, its measured figures match benchmarks/results/*.json (and the check
that says so can fail), and neither the README nor the package's docstrings carry issue numbers.

Fast and light: no Ray, no torch (mkdocstrings reads the docstrings by static analysis).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "benchmarks" / "render_docs.py"
BIN = Path(sys.executable).parent
# "#16", "(#7)", "issue 7", "issue #7", "issues 7 and 8": history belongs in CHANGELOG.md, not in the product's text
ISSUE = re.compile(r"(?<![\w&/])#\d+\b|\bissues? #?\d+", re.I)
IN_COMMENTS = re.compile(r"\bissues? #?\d+|\(#\d+\)", re.I)  # in the code at large: "#16" alone may be a colour


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=60)


def test_the_site_builds_strictly(tmp_path):
    """Broken links, missing anchors, missing pages and docstrings griffe cannot read all fail the build."""
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "getting-started/index.html", "benchmarks/index.html", "cpu-recipe/index.html",
            "architecture/index.html", "reference/core/index.html"} <= built
    reference = (tmp_path / "site" / "reference" / "core" / "index.html").read_text()
    assert 'id="dino_ray.core.loss.DINOLoss"' in reference  # the API reference is generated, not empty


def test_every_rendered_block_matches_its_json():
    done = run_check(ROOT)
    assert done.returncode == 0, done.stderr


def test_the_check_fails_naming_the_pages_of_a_changed_json(tmp_path):
    """A copy of the repository's pages and results, one figure changed by hand: the check names every block
    that shows it, and rendering again makes the pages right."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    assert run_check(tmp_path).returncode == 0  # the copy starts in step

    knn = tmp_path / "benchmarks" / "results" / "knn.json"
    data = json.loads(knn.read_text())
    data["rows"][0]["ours_s"] += 1.0
    knn.write_text(json.dumps(data))
    speed = tmp_path / "benchmarks" / "results" / "time_to_accuracy.json"
    data = json.loads(speed.read_text())
    data["curves"]["shipped"]["curve"][-1]["knn_top1"] = 60.0
    speed.write_text(json.dumps(data))

    done = run_check(tmp_path)
    assert done.returncode == 1
    named = set(done.stderr.splitlines())
    assert "docs/benchmarks.md: block 'knn' differs from benchmarks/results/knn.json" in named
    for page in ("README.md", "docs/index.md", "docs/benchmarks.md", "docs/cpu-recipe.md"):
        assert f"{page}: block 'time_to_accuracy' differs from benchmarks/results/time_to_accuracy.json" in named
    assert len(named) == 5, done.stderr  # nothing else

    rendered = subprocess.run([sys.executable, str(RENDER), "--root", str(tmp_path)], capture_output=True, text=True,
                              timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert run_check(tmp_path).returncode == 0
    assert "| **60.0** |" in (tmp_path / "README.md").read_text()


def test_the_readme_is_short_and_free_of_issue_numbers():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 40 * 1024
    assert "make quickstart" in readme and "make test" in readme
    assert ISSUE.findall(readme) == []


def test_the_package_docstrings_carry_no_issue_numbers():
    found = []
    for path in sorted((ROOT / "dino_ray").rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        docstrings = [ast.get_docstring(node) or "" for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        found += [f"{path.relative_to(ROOT)}: {hit}" for text in docstrings for hit in ISSUE.findall(text)]
        found += [f"{path.relative_to(ROOT)}: {hit} (code or comment)" for hit in IN_COMMENTS.findall(source)]
    assert found == []
