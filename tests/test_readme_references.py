"""Every file the README names (a results table, a recipe, a notebook) exists in the repository: a reference to a
result that was never committed (the README named `verify_attention.md` for sessions before its first run) fails
here. Names of files that commands write or read elsewhere are listed as such."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
# written by a command, or part of a user's own directory, not a file of this repository
WRITTEN_OR_USERS = {"config.json", "mamba_config.json", "metrics.jsonl", "benchmarks/results/test-gpu.xml"}
SEARCHED = ("benchmarks/results", "configs", "examples")  # where a bare file name is looked for


def named_files(text: str) -> set[str]:
    return set(re.findall(r"`([\w./-]+\.(?:md|json|jsonl|yaml|yml|xml|ipynb))`", text))


def resolves(name: str) -> bool:
    if (ROOT / name).exists() or (ROOT / "tests" / name).exists():
        return True
    base = Path(name).name
    return any(next((ROOT / d).rglob(base), None) is not None for d in SEARCHED)


def test_every_file_the_readme_names_exists():
    names = named_files((ROOT / "README.md").read_text())
    assert len(names) > 40  # the pattern still finds the README's references
    inside = {n for n in names - WRITTEN_OR_USERS if not n.startswith("../")}  # ../shared is beside a checkout
    missing = sorted(n for n in inside if not resolves(n))
    assert not missing, f"README names files that are not in the repository: {missing}"


def test_a_missing_name_is_found():
    assert not resolves("benchmarks/results/no_such_result.md") and not resolves("no_such_result.md")
    assert named_files("see `generate_s17.md` and `configs/recipes/x.yaml`, not `run.py`") == {
        "generate_s17.md", "configs/recipes/x.yaml"}
