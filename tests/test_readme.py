"""Every runnable snippet of README.md runs as written: its Python blocks, and its `enformer-score`
command lines that use only the bundled data (the official model stands in as a small random model
through $ENFORMER_VEP_MODEL or as ./enformer.safetensors, so nothing is downloaded)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enformer_vep.weights import save_native

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NO_MODEL_COMMANDS = {"top", "merge", "index", "pca", "convert"}  # commands without --device


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    """`enformer-score` lines of the bash blocks (continuations joined) that need no file of the user."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("enformer-score") and "~/" not in part and "PATH" not in part:
                    out.append(part)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_enformer):
    """A folder with `tests` (the bundled data) and `enformer.safetensors`: a small random model with
    the released heads, as README's snippets expect."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "tests").symlink_to(ROOT / "tests")
    model = tiny_enformer(seed=1, channels=12, heads={"human": 5313, "mouse": 1643})
    save_native(model.state_dict(),
                folder / "enformer.safetensors")
    return folder


def run(args, folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ENFORMER_VEP_MODEL=str(folder / "enformer.safetensors"))
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def test_readme_has_the_snippets_this_test_runs():
    assert len(blocks("python")) >= 2 and len(commands()) >= 2


@pytest.fixture(scope="module")
def after_commands(workdir):
    """Run README's `enformer-score` commands in order (the set-up's main job first), with the
    CPU for device and the region of the set-up on the second command (400 passes otherwise)."""
    results = []
    for command in commands():
        args = shlex.split(command)
        if "--rc" in args and "--region" not in args:
            args += ["--region", "chr1:602000-605000"]
        device = [] if args[1] in NO_MODEL_COMMANDS else ["--device", "cpu"]
        results.append((command, run([sys.executable, "-m", "enformer_vep", *args[1:], *device], workdir)))
    return workdir, results


def test_readme_commands_run(after_commands):
    _, results = after_commands
    for command, result in results:
        assert result.returncode == 0, f"{command}\n{result.stderr}"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_blocks_run(after_commands, index):
    folder, _ = after_commands
    result = run([sys.executable, "-c", blocks("python")[index]], folder)
    assert result.returncode == 0, f"{blocks('python')[index]}\n{result.stderr}"
    if "torch.zeros(1, 196_608, 4" in blocks("python")[index]:
        assert result.stdout.strip() == "torch.Size([1, 896, 5313]) torch.Size([1, 896, 1643])"
    assert torch  # the snippets' own dependency is installed
