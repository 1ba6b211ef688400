"""The wheel carries everything the entry points need: built with `pip wheel .`, installed into a
fresh venv (the dependencies taken from this one, the project itself only from the wheel), run
outside the source tree, every entry point composes its config and registers its resolvers."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(ROOT),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp),
    )
    (wheel,) = tmp.glob("sake_edit-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    site = Path(
        run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    )
    # This venv's packages (torch, transformers, ...) without its editable install of the project:
    # a plain path entry does not run the .pth files inside it.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel))
    return python, tmp


@pytest.mark.parametrize(
    "command",
    [
        ["train", "editor=mend", "model=qwen"],
        ["train", "experiment=pretrain_tiny"],
        ["evaluate", "editor=rome", "model=desta"],
        ["evaluate", "mode=compare", "runs=x"],
        ["analyze", "analysis=trace", "model=af3"],
        ["analyze", "trace", "model=tiny"],  # trace.py's command
    ],
    ids=lambda c: "-".join(c),
)
def test_every_entry_point_composes_from_the_installed_wheel(installed, command):
    python, cwd = installed
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    out = run(str(python), "-m", command[0], *command[1:], "--cfg", "job", "--resolve", cwd=cwd, env=env)
    if command[:2] == ["analyze", "trace"]:  # the bare word chose the analysis, its tuning applied
        assert "window: 1" in out.stdout and "position_stride: 1" in out.stdout
    module = run(str(python), "-c", f"import {command[0]}; print({command[0]}.__file__)", cwd=cwd, env=env)
    assert str(ROOT) not in module.stdout  # the wheel's copy, not the source tree
    assert "model:" in out.stdout and "_target_" in out.stdout
