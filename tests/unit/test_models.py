"""Tests for raydistill.models: built-ins, torchvision adaptation, user factories, errors."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from raydistill import models
from raydistill.core.metrics import count_macs


@pytest.mark.parametrize("name", sorted(models.BUILTIN_MODELS))
def test_builtins_map_digits_batch_to_logits(name):
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10, in_channels=1, image_size=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_builtins_are_plain_callable_functions():
    model = models.BUILTIN_MODELS["mlp"](3, 1, 4, hidden=(7, 5))
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert "cnn" in models.list_models() and "resnet18" in models.list_models()


def test_teacher_preset_costs_at_least_10x_student_macs():
    x = torch.randn(1, 1, 8, 8)
    teacher = models.build_model("cnn", 10, 1, 8, **models.TEACHER_CNN)
    student = models.build_model("cnn", 10, 1, 8, **models.STUDENT_CNN)
    assert models.TEACHER_CNN == {"widths": (64, 128), "hidden": 256}
    assert models.STUDENT_CNN == {"widths": (16, 32), "hidden": 64}
    assert count_macs(teacher, x) >= 10 * count_macs(student, x)


def test_resnet18_cifar_stem_keeps_resolution():
    model = models.build_model("resnet18", 10, 3, 32, cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_with_one_input_channel():
    model = models.build_model("resnet18", 10, 1, 8)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mobilenet_cifar_stem_sets_first_stride_to_one():
    model = models.build_model("mobilenet_v3_small", 10, 1, 16, cifar_stem=True)
    first = model.features[0][0]
    assert first.stride == (1, 1) and first.in_channels == 1
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_torchvision_bad_option_names_it():
    with pytest.raises(ValueError, match="'bogus_option'"):
        models.build_model("resnet18", 10, 3, 32, bogus_option=1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes mymodels.py into tmp_path and puts it on sys.path."""
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make_net(num_classes, width=4):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                                     nn.Linear(width, num_classes))

            def make_any(**kwargs):
                make_any.seen = kwargs
                return nn.Sequential(nn.Flatten(), nn.Linear(64, kwargs["num_classes"]))

            def not_a_model(num_classes):
                return "oops"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymodels"
    sys.modules.pop("mymodels", None)


def test_user_factory_gets_num_classes_and_kwarg(user_module):
    model = models.build_model("mymodels:make_net", 7, 1, 8, width=9)
    assert model[1].out_features == 9
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_user_factory_with_var_kwargs_gets_all_dims(user_module):
    models.build_model("mymodels:make_any", 5, 1, 8)
    assert sys.modules["mymodels"].make_any.seen == {
        "num_classes": 5,
        "in_channels": 1,
        "image_size": 8,
        "input_shape": (1, 8, 8),
    }


def test_user_factory_bad_kwarg_is_named(user_module):
    with pytest.raises(ValueError, match="depth"):
        models.build_model("mymodels:make_net", 7, 1, 8, depth=3)


def test_user_factory_returning_non_module(user_module):
    with pytest.raises(ValueError, match="returned str, not a torch.nn.Module"):
        models.build_model("mymodels:not_a_model", 7, 1, 8)


def test_user_factory_missing_function(user_module):
    with pytest.raises(ValueError, match="has no function 'nope'"):
        models.build_model("mymodels:nope", 7, 1, 8)


def test_non_importable_module():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_xyz.models'"):
        models.build_model("no_such_pkg_xyz.models:make", 10, 1, 8)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'cnn'"):
        models.build_model("cnnn", 10, 1, 8)


def test_builtin_bad_kwarg_lists_accepted_options():
    with pytest.raises(ValueError, match="does not accept option.*depth.*widths"):
        models.build_model("cnn", 10, 1, 8, depth=3)
