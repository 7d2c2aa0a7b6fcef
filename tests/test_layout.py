"""The package's shape: imports point down the floors of docs/design.md, and no module grows past ~500 lines
without saying why in its docstring."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nsync_jax"
# Floors, bottom up; a module imports only from its own floor or below (the longest matching prefix decides).
FLOORS = {
    "nsync_jax.errors": 0,
    **dict.fromkeys(["nsync_jax.files", "nsync_jax.imageio", "nsync_jax.config", "nsync_jax.distributed",
                     "nsync_jax.optim", "nsync_jax.metrics", "nsync_jax.schedulers", "nsync_jax.weights",
                     "nsync_jax.data.latent_cache", "nsync_jax.editing.losses", "nsync_jax.toyworld.world",
                     "nsync_jax.train.registry"], 1),
    **dict.fromkeys(["nsync_jax.models", "nsync_jax.tokens", "nsync_jax.lora", "nsync_jax.checkpoints",
                     "nsync_jax.convert", "nsync_jax.sources", "nsync_jax.single_file", "nsync_jax.data",
                     "nsync_jax.captions"], 2),
    **dict.fromkeys(["nsync_jax.pipeline", "nsync_jax.export", "nsync_jax.evaluate",
                     "nsync_jax.edit_metrics", "nsync_jax.metric_networks"], 3),
    "nsync_jax.sdxl": 3,
    **dict.fromkeys(["nsync_jax.sampling", "nsync_jax.editing"], 4),
    **dict.fromkeys(["nsync_jax.negatives", "nsync_jax.train"], 5),
    "nsync_jax.toyworld": 6,
    "nsync_jax.cli": 7,
    "nsync_jax": 7,  # the package's __init__
}
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(name: str) -> int:
    prefix = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{name}: not on any floor; add it to FLOORS in tests/test_layout.py"
    return FLOORS[prefix]


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def package_imports(path: Path) -> set[str]:
    """The package's modules that `path` imports (`from nsync_jax import x` imports module `nsync_jax.x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nsync_jax"):
            names.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("nsync_jax"))
    return names


def test_imports_point_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        upward += [f"{name} (floor {floor(name)}) imports {imported} (floor {floor(imported)})"
                   for imported in package_imports(path) if floor(imported) > floor(name)]
    assert not upward, "\n".join(sorted(upward))


def test_long_modules_say_why():
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_LINES and "on purpose" not in docstring:
            unexplained.append(f"{module_name(path)}: {text.count(chr(10))} lines")
    assert not unexplained, "\n".join(unexplained)
