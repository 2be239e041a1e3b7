"""Import direction (DESIGN §3): distribution stays at the edge, maths never imports Ray/DeepSpeed/W&B."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"ray", "deepspeed", "wandb"}
# layer of each tracerl module: a module may import only modules of its own or a lower layer
LAYERS = {
    "config": 0, "records": 0, "metrics": 0, "registry": 0, "seeding": 0, "hub": 0, "quiet": 0,
    "data": 1, "stages": 1, "models": 1, "sampling": 1, "trace": 1, "packed": 1, "canvas_trace": 1, "advantages": 1,
    "objectives": 1, "reward_service": 1, "reward_resolve": 1, "checkpoint": 1, "scoring": 1, "stats": 1,
    "weight_sync": 1, "report": 1, "config_docs": 1, "manifest": 1, "runs": 1, "reward_models": 1,
    "checks": 2, "reward_server": 2, "learner": 2, "workers": 2,
    "sft": 3, "orchestrator": 3,
    "cli": 4,
}  # fmt: skip
ALLOWED_HEAVY = {"learner": {"deepspeed"}, "workers": {"ray"}, "orchestrator": {"ray", "wandb"}, "metrics": {"wandb"}}


def imports(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (including inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def tracerl_modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "tracerl").rglob("*.py"):
        rel = path.relative_to(ROOT / "tracerl")
        out.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return out


def test_every_module_has_a_layer():
    unknown = set(tracerl_modules()) - set(LAYERS) - {"__init__"}
    assert not unknown, f"give these modules a layer in tests/test_layering.py: {sorted(unknown)}"


def test_heavy_dependencies_only_at_the_edge():
    for module, paths in tracerl_modules().items():
        for path in paths:
            heavy = {name.split(".")[0] for name in imports(path)} & HEAVY
            assert heavy <= ALLOWED_HEAVY.get(module, set()), f"{path.name} imports {heavy}"


def test_only_the_deepspeed_engine_imports_deepspeed():
    """The engine seam (DESIGN §20): algorithm code talks to an Engine; one file implements it with DeepSpeed."""
    importers = sorted(
        str(path.relative_to(ROOT / "tracerl"))
        for path in (ROOT / "tracerl").rglob("*.py")
        if "deepspeed" in {name.split(".")[0] for name in imports(path)}
    )
    assert importers == ["learner/deepspeed_engine.py"]


def test_imports_point_down():
    for module, paths in tracerl_modules().items():
        if module == "__init__":
            continue
        for path in paths:
            for name in imports(path):
                parts = name.split(".")
                if parts[0] != "tracerl" or len(parts) < 2:
                    continue
                assert LAYERS[parts[1]] <= LAYERS[module], f"{module} ({path.name}) imports the higher {name}"


def test_rewards_import_without_torch_or_ray():
    code = "import sys, rewards; bad = {'torch', 'ray', 'deepspeed', 'wandb'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_maths_modules_import_without_ray_deepspeed_wandb():
    code = (
        "import sys, tracerl.trace, tracerl.packed, tracerl.objectives, tracerl.advantages, tracerl.sampling,"
        " tracerl.models, tracerl.seeding, tracerl.stages;"
        "print(sorted({'ray', 'deepspeed', 'wandb'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
