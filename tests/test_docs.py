"""The docs say what the code does: the README's method count and method table match the registry."""

import re
from pathlib import Path

from attnpatch import list_methods

ROOT = Path(__file__).parents[1]


def test_readme_counts_and_lists_every_method_with_its_family():
    readme = (ROOT / "README.md").read_text()
    methods = {m.name: m.family for m in list_methods()}
    count = int(re.search(r"^(\d+) methods in ", readme, re.M).group(1))
    assert count == len(methods), f"README says {count} methods; the registry has {len(methods)}"
    rows = {}
    for names, family in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([\w-]+) \|", readme, re.M):
        rows.update({name: family for name in re.findall(r"`(\w+)`", names)})
    assert rows == methods


def test_the_package_readme_table_lists_every_method_with_its_family():
    text = (ROOT / "attnpatch" / "README.md").read_text()
    rows = {}
    for names, family in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([\w-]+) \|", text, re.M):
        rows.update({name: family for name in re.findall(r"`(\w+)`", names)})
    methods = {m.name: m.family for m in list_methods()}
    assert {n: rows.get(n) for n in methods} == methods
