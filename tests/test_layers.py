"""The one rule of the layers (docs/architecture.md), checked on the source: the library never imports the recipes
or the command line, and the inference path (generate, info, adapters at inference) never reaches the training
code, not even through an import inside a function."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SOURCE / "neodragon"
LIBRARY = ("models", "schedulers", "pipelines", "data", "training", "adapters", "eval", "deploy", "utils", "presets")
TOP = ("recipes", "cli")
INFERENCE_ENTRY_POINTS = ("neodragon.cli.generate", "neodragon.cli.info", "neodragon.adapters.loading",
                          "neodragon.presets", "neodragon.pipelines")
TRAINING = ("neodragon.training", "neodragon.recipes", "neodragon.adapters.training")


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The module of ``name`` (an imported module, or a name imported from one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every neodragon module ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {resolved for name in names if name.startswith("neodragon") and (resolved := resolve(name))}
    return found - {module}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imports(module)
    return seen


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_walk_sees_imports_inside_functions():
    assert "neodragon.recipes.teacher" in imports("neodragon.cli.train")  # imported inside the command's body
    assert "neodragon.training.trainer" in reachable("neodragon.cli.train")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in LIBRARY))
def test_the_library_never_imports_recipes_or_the_cli(module):
    upward = sorted(m for m in imports(module) if layer(m) in TOP)
    assert not upward, f"{module} imports {upward}: the library may not depend on recipes/ or cli/"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "recipes"))
def test_recipes_are_leaves(module):
    users = sorted(m for m in MODULES if module in imports(m) and layer(m) not in ("cli", "recipes"))
    assert not users, f"{module} is imported by {users}: only the command line imports recipes"


@pytest.mark.parametrize("entry", INFERENCE_ENTRY_POINTS)
def test_inference_never_reaches_the_training_code(entry):
    reached = sorted(m for m in reachable(entry) if m.startswith(TRAINING))
    assert not reached, f"{entry} reaches {reached}"
