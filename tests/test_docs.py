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


def test_the_tables_trains_column_agrees_with_each_method():
    """'no ...' in a README's trains column exactly where the method has no trainable parameters."""
    trainable = {m.name: m.trainable for m in list_methods()}
    for readme in (ROOT / "README.md", ROOT / "attnpatch" / "README.md"):
        for names, trains in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| [\w-]+ \| .* \| ([^|]+) \|$", readme.read_text(), re.M):
            for name in re.findall(r"`(\w+)`", names):
                assert trains.strip().startswith("no") != trainable[name], (readme.name, name, trains)


def test_the_recipes_dry_run_table_is_what_the_dry_run_prints():
    """recipes/README.md's memory per GPU for the large recipes, against dry_run on their architectures."""
    from attnpatch.recipes.config import RecipeConfig
    from attnpatch.recipes.dry_run import dry_run

    table = (ROOT / "recipes" / "README.md").read_text()
    for recipe, architecture in (("llama3_8b_lolcats.yaml", "llama3-8b"), ("llama3_70b_lolcats.yaml", "llama3-70b")):
        row = re.search(rf"^\| `{recipe}` \|.*\| ~([\d.]+) GB \| ~([\d.]+) GB", table, re.M)
        config = RecipeConfig.load(ROOT / "recipes" / recipe, [f"model={ROOT / 'recipes/configs' / architecture}"])
        stages = dry_run(config, processes=8)["stages"]
        assert row and [float(row.group(1)), float(row.group(2))] == [round(stages["stage1"]["total_gb"], 1),
                                                                      round(stages["stage2"]["total_gb"], 1)], recipe


def test_every_method_declares_its_paper_and_its_deviations():
    """In its own class: `paper` (title, year, link) and `deviations` (an empty tuple says none is known)."""
    from attnpatch.methods.base import Paper
    from attnpatch.registry import get_method, method_names

    for name in method_names():
        cls = get_method(name)
        assert isinstance(vars(cls).get("paper"), Paper), f"{name} declares no paper"
        assert isinstance(vars(cls).get("deviations"), tuple), f"{name} declares no deviations (an empty tuple for none)"
        assert cls.paper.url.startswith("https://") and 1990 < cls.paper.year < 2100 and cls.paper.title, name


def test_the_papers_section_is_generated_from_the_classes():
    from attnpatch.registry import papers_markdown

    text = (ROOT / "attnpatch" / "README.md").read_text()
    section = text.split("<!-- papers:start -->\n")[1].split("\n<!-- papers:end -->")[0]
    assert section == papers_markdown(), "regenerate the section with attnpatch.registry.papers_markdown()"
    assert "keys are cached after RoPE at their absolute positions" in section  # a declared deviation shows


def test_list_papers_prints_each_method_with_its_paper(capsys):
    from attnpatch.cli import main

    assert main(["list", "--papers"]) == 0
    out = capsys.readouterr().out
    assert "streaming: Efficient Streaming Language Models with Attention Sinks (2023) https://arxiv.org/abs/2309.17453" in out
    assert out.count("\n") >= 2 * len(list_methods())
