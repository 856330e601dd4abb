"""timm models and teacher.pretrained, without Ray and without any download (random timm weights, local files)."""

import pytest
import torch

from raydistill import config
from raydistill.checkpoints import build_from_spec, model_spec
from raydistill.core.pruning import ChannelPruner
from raydistill.errors import CheckpointError, ConfigError, ModelError
from raydistill.models import build_model
from raydistill.pretrained import fit_state, head_of, pretrained_state

TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


@pytest.mark.parametrize("name, kwargs, shape", [("timm:resnet18", TINY_RESNET, (1, 8, 8)),
                                                 ("timm:vit_tiny_patch16_224", TINY_VIT, (3, 8, 12))])
def test_timm_models_take_classes_channels_and_size_from_the_data(name, kwargs, shape):
    model = build_model(name, 7, input_shape=shape, **kwargs).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name, kwargs, match", [
    ("timm:resnet81", {}, r"unknown timm model 'resnet81': did you mean 'timm:resnet18'"),
    ("timm:resnet18", {"pretrained": True}, "set by raydistill"),
    ("timm:resnet18", {"in_chans": 3}, "set by raydistill"),
    ("timm:resnet18", {"bogus": 1}, "does not accept option 'bogus'"),
])
def test_timm_bad_input_is_one_line(name, kwargs, match):
    with pytest.raises(ModelError, match=match) as err:
        build_model(name, 10, input_shape=(1, 8, 8), **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, kwargs", [("timm:resnet18", TINY_RESNET), ("timm:vit_tiny_patch16_224", TINY_VIT)])
def test_prune_and_quantize_a_timm_model(name, kwargs):
    """Channel pruning and int8 on a timm ResNet and a ViT; the ViT's attention projections are left whole, named
    (the export of a timm ViT student runs in tests/integration/test_python_api.py)."""
    from raydistill.core.quantize import quantize_int8

    torch.manual_seed(0)
    model, x = build_model(name, 10, input_shape=(1, 8, 8), **kwargs).eval(), torch.randn(4, 1, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    pruner = ChannelPruner(model, x[:1])
    if "vit" in name:
        assert "attention projection" in pruner.skipped["blocks.0.attn.qkv"]
    pruner.mask_(0.5)
    pruner.remove_()
    assert sum(p.numel() for p in model.parameters()) < params and model(x).shape == (4, 10)
    assert torch.allclose(quantize_int8(model, "weight_only")(x), model(x), atol=0.05)


# ---- teacher.pretrained ----------------------------------------------------------------------------------------
SPEC = model_spec("cnn", {"widths": [4], "hidden": 8}, 10, (1, 8, 8))


def _saved(tmp_path, state, name="w.pt"):
    torch.save(state, tmp_path / name)
    return str(tmp_path / name)


def test_a_state_dict_file_is_the_teachers_start(tmp_path):
    torch.manual_seed(1)
    source = build_from_spec(SPEC)
    state = pretrained_state(SPEC, _saved(tmp_path, source.state_dict()), replace_head=False)
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    wrapped = pretrained_state(SPEC, _saved(tmp_path, {"state_dict": source.state_dict()}, "c.pth"), False)
    assert all(torch.equal(wrapped[k], v) for k, v in source.state_dict().items())


def test_another_class_count_needs_replace_head(tmp_path):
    torch.manual_seed(1)
    five = build_from_spec(model_spec("cnn", {"widths": [4], "hidden": 8}, 5, (1, 8, 8)))
    path = _saved(tmp_path, five.state_dict())
    with pytest.raises(CheckpointError, match=r"classifier \d+\.(bias|weight) has shape .*teacher.replace_head=true"):
        pretrained_state(SPEC, path, replace_head=False)
    state, head = pretrained_state(SPEC, path, replace_head=True), head_of(five) + ".weight"
    assert state[head].shape == (10, 8) and torch.equal(state["1.weight"], five.state_dict()["1.weight"])
    assert torch.equal(state[head], pretrained_state(SPEC, path, replace_head=True)[head])  # same fresh head


def test_mismatching_keys_are_named(tmp_path):
    state = build_from_spec(SPEC).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.weight"]
    with pytest.raises(CheckpointError, match=r"missing 0\.weight; unexpected extra\.weight"):
        pretrained_state(SPEC, _saved(tmp_path, state), False)
    wide = build_from_spec(model_spec("cnn", {"widths": [6], "hidden": 8}, 10, (1, 8, 8))).state_dict()
    with pytest.raises(CheckpointError, match=r"shape differs for 0\.weight \(6, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        fit_state(build_from_spec(SPEC), wide, replace_head=True, source="test")


class Pickled:  # any class: weights_only refuses to rebuild it
    pass


def test_a_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Pickled()}, path)
    with pytest.raises(CheckpointError, match="not a weights file torch can read safely"):
        pretrained_state(SPEC, str(path), False)
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrained_state(SPEC, str(tmp_path / "none.pt"), False)


def test_zoo_names_are_checked_without_downloading():
    tv = model_spec("resnet18", {}, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"not a weight of torchvision's resnet18; did you mean 'IMAGENET1K_V1'"):
        pretrained_state(tv, "IMAGENET1K_V9", True)
    tm = model_spec("timm:resnet18", TINY_RESNET, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"not a pretrained tag of timm's resnet18; did you mean 'a1_in1k'"):
        pretrained_state(tm, "a1_in1kk", True)
    with pytest.raises(ConfigError, match="not a torchvision or timm model; give a weights file"):
        pretrained_state(SPEC, "IMAGENET1K_V1", True)
    with pytest.raises(ConfigError, match="teacher.pretrained and teacher.checkpoint are both set"):
        config.load(None, {"teacher.pretrained": "w.pt", "teacher.checkpoint": "t.pt"})
