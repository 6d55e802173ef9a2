"""The package's layers, top to bottom: every import (function-level ones included) points down
or stays inside its own package, and modules import each other without a cycle.

    __init__ -> cli -> evaluation, recipes -> analysis -> models -> api -> config
      -> registry, adapters -> routing -> methods -> runtime -> ops -> errors

runtime/ is split by call direction: routing/ (normalising a library's call, equipping its cache,
dispatching) serves the adapters and sits above the methods; runtime/ (the call type, exact attention,
cache layers and facts, the attention modes) serves the methods and sits below them.
"""

import ast
import re
from pathlib import Path

import attnpatch

PACKAGE = Path(attnpatch.__file__).parent
# rank of each top-level part: an import may only go to a lower rank, or within the same part
RANKS = {"errors": 0, "ops": 1, "runtime": 2, "methods": 3, "routing": 4, "registry": 5, "adapters": 5, "config": 6,
         "api": 7, "models": 8, "analysis": 9, "evaluation": 10, "recipes": 10, "cli": 11, "__init__": 12}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """attnpatch modules `path` imports anywhere in its body (as module names, resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("attnpatch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("attnpatch"):
                target = node.module
            else:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{target}.{alias.name}" if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).exists()
                          or (PACKAGE.parent / (f"{target}.{alias.name}".replace(".", "/") + ".py")).exists() else target)
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_part_has_a_rank():
    assert {part(m) for m in graph()} <= set(RANKS), sorted({part(m) for m in graph()} - set(RANKS))


def test_no_import_points_up():
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if part(t) != part(m) and RANKS[part(t)] >= RANKS[part(m)]]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    modules = set(edges)

    def resolve(target: str) -> str | None:  # a name imported from a package's __init__ counts as the package
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in targets if (r := resolve(t)) and r != m} for m, targets in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_module_is_over_300_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


# each family's folder under methods/ (the package scan registers what it finds there)
FAMILY_OF_FOLDER = {"sparse": "sparse", "linear": "linearized", "heads": "head-pruned", "kv": "kv-compressed",
                    "sinks": "sink-recalibrated", "tokens": "tokens", "reference": "reference"}


def test_each_builtin_method_sits_in_its_familys_folder():
    from attnpatch.registry import get_method, method_names

    misplaced = {}
    for name in method_names():
        cls = get_method(name)
        folder = cls.__module__.split(".")[2]  # attnpatch.methods.<folder>[.file]
        if FAMILY_OF_FOLDER.get(folder) != cls.family:
            misplaced[name] = (cls.__module__, cls.family)
    assert not misplaced, misplaced


# attribute paths and classes of particular model families: adapters/ knows them (adapters/parts.py
# answers what methods ask of a model); methods/ never names one
MODEL_ATTRIBUTES = {"vision_tower", "language_model", "multi_modal_projector", "get_image_features", "image_token_id",
                    "vision_feature_layer", "vision_feature_select_strategy", "vision_config", "text_config",
                    "rotary_emb", "add_q_proj", "layernorm_after", "layer_norm2", "norm2", "embeddings", "cls_token",
                    "class_embedding", "register_tokens", "patch_size", "q_proj", "k_proj", "v_proj", "o_proj",
                    "out_proj", "qkv_proj", "to_q", "to_k", "to_v", "to_out", "lm_head", "self_attn"}
MODEL_CLASS = re.compile(r"^(Llava|Llama|Mistral|Qwen\d?|Gemma\d?|Phi\d?|ViT|CLIP|Siglip|SigLIP|DiT|PixArt|SD3)\w*$")


def test_methods_name_no_model_class_or_attribute_path():
    found = []
    for path in (PACKAGE / "methods").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES:
                found.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and node.value.split(".")[-1] in MODEL_ATTRIBUTES:
                found.append(f"{where} {node.value!r}")
            elif isinstance(node, ast.Name) and MODEL_CLASS.match(node.id):
                found.append(f"{where} {node.id}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("transformers.models",
                                                                                       "diffusers.models")):
                found.append(f"{where} from {node.module}")
    assert not found, "model knowledge under methods/ (ask the site's parts instead):\n" + "\n".join(found)


def test_eval_top_level_is_a_suite_not_a_heap():
    """Scripts live in eval/benchmarks, eval/gpu and eval/runs; the top level holds at most 10 files."""
    files = [p.name for p in (PACKAGE.parent / "eval").iterdir() if p.is_file()]
    assert len(files) <= 10, files
