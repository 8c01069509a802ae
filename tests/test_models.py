import pytest
import torch
from opacus.validators import ModuleValidator

from shared.errors import BadInput
from shared.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS)
def test_every_builtin_model_passes_opacus_validator(name):
    model = build_model(name, 64, 10, image_side=8)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(5, 64)).shape == (5, 10)


def test_cnn_needs_images():
    with pytest.raises(BadInput, match="square image"):
        build_model("cnn", 30, 2, image_side=None)


def test_unknown_model():
    with pytest.raises(BadInput, match="unknown model"):
        build_model("resnet", 30, 2)
