"""The README's API tour is executed, block by block, in one namespace."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_tour_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    # spot-check the values the comments claim
    assert ns["affine_quantize"](torch.tensor([0.26, -1.0, 9.0]), 0.5, 2, 8).tolist() == [0.5, -1.0, 2.5]
    assert ns["t"].grad.tolist() == [0.0, 1.0, 0.0]
    assert ns["lo"].shape == (16, 1, 1, 1)
    assert ns["y"].shape == (2, 16 * 8 * 8)
