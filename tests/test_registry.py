"""The registry finds methods itself: built-ins by scanning attnpatch/methods (a method is one file),
plugins through the `attnpatch.methods` entry-point group of installed packages."""

from __future__ import annotations

import ast
import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import cache_kwargs, cache_nbytes, list_methods, patch_model, unpatch_model
from attnpatch.registry import get_method, load_plugins, method_names, unregister_method
from attnpatch.runtime.layers import CompressedKVLayer

PACKAGE = Path(__file__).parents[1] / "attnpatch"


def test_every_method_file_is_found_without_a_list():
    """Each file under methods/ whose class sets `name` is registered; nothing else names them."""
    declared = set()
    for path in (PACKAGE / "methods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                    for target in targets:
                        names = target.elts if isinstance(target, ast.Tuple) else [target]
                        if any(isinstance(n, ast.Name) and n.id == "name" for n in names):
                            declared.add(node.name)
    registered = set(method_names())
    assert len(declared) == len(registered) >= 31, (sorted(declared), registered)


def test_the_registry_never_imports_the_methods_package():
    tree = ast.parse((PACKAGE / "registry.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported & {"methods", ".methods"} == set() and "methods.base" in imported, imported


PLUGIN = '''
from attnpatch.methods.kv import KVCompressionMethod


class NewestKeys(KVCompressionMethod):
    """Keeps the newest entries (score = position): a scorer as a third-party package ships it."""

    name = "_plugin_newest"
    summary = "plugin test: keep the newest entries"

    def score(self, keys, attention, valid):
        return keys.new_tensor(range(keys.shape[2]), dtype=keys.dtype).expand(keys.shape[:3]).float()
'''


@pytest.fixture
def plugin_on_path(tmp_path):
    """A package `attnpatch_test_plugin` with one method, installed the way pip leaves it: the code
    plus a dist-info folder whose entry_points.txt names the method in the attnpatch.methods group."""
    (tmp_path / "attnpatch_test_plugin").mkdir()
    (tmp_path / "attnpatch_test_plugin" / "__init__.py").write_text("")
    (tmp_path / "attnpatch_test_plugin" / "newest.py").write_text(PLUGIN)
    info = tmp_path / "attnpatch_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnpatch-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [attnpatch.methods]
        newest = attnpatch_test_plugin.newest:NewestKeys
        broken = attnpatch_test_plugin.missing:Nothing
        """))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("attnpatch_test_plugin")]:
        del sys.modules[name]


def test_a_method_from_an_installed_package_registers_through_its_entry_point_and_patches(plugin_on_path):
    with pytest.warns(UserWarning, match=r"skipped the method plugin entry point 'broken'.*attnpatch-test-plugin"):
        added = load_plugins()
    assert added == ["_plugin_newest"]
    info = {m.name: m for m in list_methods()}["_plugin_newest"]
    assert info.family == "kv-compressed" and any(p["name"] == "compression" for p in info.params)

    model = tm.build("llama")
    ids, _ = tm.text_batch(length=12)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    patch_model(model, "_plugin_newest", budget=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer, CompressedKVLayer) and layer.stored_tokens == 4
    dense = DynamicCache(config=model.config)
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, dense))
    # 4 of 12 entries per layer, plus the valid mask's bookkeeping
    assert cache_nbytes(dense) / 3 < cache_nbytes(cache) <= 1.05 * cache_nbytes(dense) / 3
    # the scorer's choice: the 4 newest keys are the ones kept
    assert torch.equal(layer.keys[0, 0], dense.layers[0].keys[0, 0, -4:])
    unregister_method("_plugin_newest")


def test_a_plugin_cannot_take_a_builtin_name(plugin_on_path, tmp_path):
    info = tmp_path / "attnpatch_test_plugin-0.1.dist-info" / "entry_points.txt"
    info.write_text("[attnpatch.methods]\nshadow = attnpatch_test_plugin.shadow:Shadow\n")
    (tmp_path / "attnpatch_test_plugin" / "shadow.py").write_text(PLUGIN.replace('"_plugin_newest"', '"snapkv"')
                                                                   .replace("class NewestKeys", "class Shadow"))
    with pytest.warns(UserWarning, match=r"'shadow'.*already registered"):
        assert load_plugins() == []
    assert get_method("snapkv").__module__ == "attnpatch.methods.kv.snapkv"
