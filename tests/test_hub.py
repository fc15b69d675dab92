"""torch.hub: ``hubconf.py`` at the root, loaded from the checkout (``source="local"``)."""

from __future__ import annotations

import torch
from helpers import ROOT

import restv2


def test_hub_load_local_passes_arguments():
    model = torch.hub.load(str(ROOT), "rest_lite", source="local", num_classes=3, backend="reference")
    assert type(model) is restv2.ResT and model.num_classes == 3 and model.backend == "reference"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_hub_load_checkpoint_path(tmp_path):
    torch.manual_seed(0)
    src = restv2.restv2_tiny()
    path = tmp_path / "restv2_tiny_224.pth"
    torch.save({"model": src.state_dict()}, path)
    model = torch.hub.load(str(ROOT), "restv2_tiny", source="local", checkpoint_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_hub_list_and_help(monkeypatch):
    """torch.hub.list and torch.hub.help take only GitHub repositories; the download step is
    replaced by this checkout, so what they read is the real hubconf.py."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))
    assert sorted(torch.hub.list("owner/restv2", trust_repo=True, verbose=False)) == sorted(restv2.MODELS)
    doc = torch.hub.help("owner/restv2", "restv2_tiny", trust_repo=True)
    assert doc.startswith("ResTv2-T: 30.43M params") and "checkpoint_path:" in doc and "backend" in doc
