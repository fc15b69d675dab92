"""The README's "Use with timm / torch.hub / torchvision / ONNX" snippets, run as written, in a
folder holding the checkpoint they load (``path/to/restv2`` stands for this checkout)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ROOT, require

for _module in ("timm", "torchvision", "onnxscript", "onnxruntime"):
    require(_module)

import restv2  # noqa: E402

SECTION = "## Use with timm / torch.hub / torchvision / ONNX"


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_the_five_snippets():
    blocks = _blocks()
    assert len(blocks) == 5
    for word in ("timm.create_model", "torch.hub.load", "fpn_backbone", "torch.onnx.export", "torch.export.export"):
        assert sum(word in b for b in blocks) == 1, word


@pytest.mark.parametrize("index", range(5))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save({"model": restv2.restv2_tiny().state_dict()}, tmp_path / "restv2_tiny_224.pth")
    monkeypatch.chdir(tmp_path)
    code = _blocks()[index].replace("path/to/restv2", str(ROOT))
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
