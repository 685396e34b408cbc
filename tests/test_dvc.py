"""dvc.yaml: every stage depends on the code its command imports (else `dvc repro` silently
reuses outputs made by older code)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tlpipe import params

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def imported_modules(start: list[str]) -> set[str]:
    """`tlpipe.*` modules reachable from `start` through any import, also inside functions."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # submodules
        todo += _parents(name)
    return seen


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] != "tlpipe":
        return None
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` expanded over params.yaml's strategies."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    strategies = yaml.safe_load((REPO / "params.yaml").read_text())["strategies"]
    out = {}
    for name, stage in spec.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for item in strategies:
            text = yaml.safe_dump(stage["do"]).replace("${item}", item)
            out[f"{name}@{item}"] = yaml.safe_load(text)
    return out


def uncovered(stage: dict) -> list[str]:
    """Files of the modules the stage's command imports that none of its deps covers."""
    words = stage["cmd"].split()
    assert words[0] == "tlpipe", stage["cmd"]
    command = words[1]
    start = ["tlpipe.cli", "tlpipe.runner"]  # the entry point; the runner imports the step:
    start += [f"tlpipe.steps.{command}"] if _module_file(f"tlpipe.steps.{command}") else []
    deps = [REPO / d for d in stage.get("deps", [])]
    files = {_module_file(m) for m in imported_modules(start)}
    return sorted(
        str(f.relative_to(REPO))
        for f in files
        if f is not None and not any(f == d or d in f.parents for d in deps)
    )


def test_every_stage_depends_on_the_code_its_command_imports() -> None:
    problems = {name: missing for name, stage in stages().items() if (missing := uncovered(stage))}
    assert not problems, problems


def test_the_check_catches_a_stage_with_hand_listed_deps() -> None:
    stage = {"cmd": "tlpipe finetune --strategy full", "deps": ["src/tlpipe/steps/finetune.py"]}
    missing = uncovered(stage)
    for module in (
        "train/models.py",
        "train/loop.py",
        "runner.py",
        "tracking.py",
        "train/joint.py",
    ):
        assert f"src/tlpipe/{module}" in missing


def test_stages_read_their_params_sections_and_the_strategy_set() -> None:
    spec = stages()
    for section in params.SECTIONS:
        assert any(section in stage.get("params", []) for stage in spec.values()), section
    assert "strategies" in spec["evaluate"]["params"]  # the set evaluate compares
    assert {n.split("@")[1] for n in spec if n.startswith("finetune@")} == set(
        yaml.safe_load((REPO / "params.yaml").read_text())["strategies"]
    )


def test_pretrain_depends_on_exactly_the_source_files_it_reads() -> None:
    """New target images must not re-train the source model: pretrain's data deps are the
    source side only, and they are every file of the prepared dir that pretrain reads."""
    from tlpipe.data.manifest import SOURCE_FILES

    deps = stages()["pretrain"]["deps"]
    data = sorted(d.removeprefix("data/prepared/") for d in deps if d.startswith("data/"))
    assert data == sorted(SOURCE_FILES)


def test_pretrain_reads_no_target_file(tiny_prepared: Path, tmp_path: Path) -> None:
    """pretrain on a prepared dir that holds only SOURCE_FILES: it reads nothing else."""
    import shutil

    from tlpipe.data.manifest import SOURCE_FILES
    from tlpipe.params import PretrainConfig, TrainConfig
    from tlpipe.steps import pretrain

    only = tmp_path / "prepared"
    only.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(tiny_prepared / name, only / name)
    cfg = PretrainConfig(train=TrainConfig(epochs=1, batch_size=64))
    result = pretrain.run(only, tmp_path / "source.pt", cfg)
    assert result.model_path.is_file()
