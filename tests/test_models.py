"""edgeft.models: the registry, head replacement, channel adaptation, and every way of getting
weights (none, imagenet from the hub cache, an edgeft checkpoint, a plain state_dict)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from torch import nn

from edgeft.checkpoint import save_checkpoint
from edgeft.errors import InputError
from edgeft.models import (
    backbone_bn_eval,
    freeze_backbone,
    get_model,
    head_name,
    imagenet_weights_file,
    list_models,
    load_weights_file,
    model_info,
)

REQUIRED = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "densenet121",
    "densenet169",
    "densenet201",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]


def random_resnet18_state(seed: int = 123) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 (1000 classes, random init) as a state_dict, with non-trivial
    BatchNorm statistics so that they are told apart from a fresh model's."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
    return state


def backbone_keys(state: dict, head: str = "fc.") -> list[str]:
    return [key for key in state if not key.startswith(head)]


def assert_backbone_equal(model: nn.Module, state: dict, *, skip=("fc.", "conv1.weight")) -> None:
    own = model.state_dict()
    checked = 0
    for key, value in state.items():
        if key.startswith(skip):
            continue
        assert torch.equal(own[key], value), key
        checked += 1
    assert checked > 50


def edgeft_checkpoint_content(model: nn.Module, *, arch: str, num_classes: int, in_chans: int = 3) -> dict:
    return {
        "arch": arch,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "classes": [f"c{i}" for i in range(num_classes)],
        "preprocess": {
            "size": 16,
            "resize": 16,
            "mean": [0.5] * in_chans,
            "std": [0.25] * in_chans,
            "channels": in_chans,
            "interpolation": "bilinear",
        },
        "state_dict": model.state_dict(),
    }


class NotATensor:
    """Something a weights-only load must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


class RunsCode:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- registry ---------------------------------------------------------------------------------


def test_list_models_has_the_required_backbones():
    names = list_models()
    for name in REQUIRED:
        assert name in names
    assert len(names) == len(set(names))


def test_unknown_model_lists_the_choices():
    with pytest.raises(InputError) as info:
        get_model("resnet19", num_classes=3)
    message = str(info.value)
    assert "resnet19" in message
    for name in list_models():
        assert name in message
    with pytest.raises(InputError):
        model_info("vit_b_16")
    with pytest.raises(InputError):
        imagenet_weights_file("nope")


def test_needs_two_classes_and_one_or_three_channels():
    with pytest.raises(InputError):
        get_model("resnet18", num_classes=1)
    with pytest.raises(InputError):
        get_model("resnet18", num_classes=3, in_chans=2)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "densenet121", "mobilenet_v3_small"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_head_and_stem_follow_the_request(name, in_chans):
    model = get_model(name, num_classes=7, in_chans=in_chans).eval()
    head = model.get_submodule(head_name(model))
    assert isinstance(head, nn.Linear) and head.out_features == 7
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, 7)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_chans


def test_model_info_matches_torchvision_metadata(torch_home):
    for name in ("resnet18", "densenet121", "mobilenet_v3_small"):
        info = model_info(name)
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        assert info.params_m == pytest.approx(meta["num_params"] / 1e6)
        assert info.gmacs == pytest.approx(meta["_ops"])
        assert info.weights_file.parent == torch_home / "hub" / "checkpoints"
        assert info.cached is False


# --- ImageNet weights from the hub cache --------------------------------------------------------


def expected_weights_file(name: str) -> str:
    return os.path.basename(torchvision.models.get_model_weights(name).DEFAULT.url)


def test_imagenet_offline_names_the_file_and_folder(torch_home):
    assert expected_weights_file("resnet18") == "resnet18-f37072fd.pth"
    folder = torch_home / "hub" / "checkpoints"
    assert imagenet_weights_file("resnet18") == folder / "resnet18-f37072fd.pth"
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message
    assert str(folder) in message
    assert not (folder / "resnet18-f37072fd.pth").exists()  # no partial download left behind


def test_imagenet_weights_are_read_from_the_hub_cache(torch_home):
    state = random_resnet18_state()
    path = torch_home / "hub" / "checkpoints" / expected_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    model = get_model("resnet18", num_classes=5, weights="imagenet")
    assert_backbone_equal(model, state, skip=("fc.",))
    assert model.fc.weight.shape == (5, 512)  # a new head of the new size
    assert model_info("resnet18").cached is True

    gray = get_model("resnet18", num_classes=5, in_chans=1, weights="imagenet")
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(gray.conv1.weight.detach(), state["conv1.weight"].sum(dim=1, keepdim=True))
    assert_backbone_equal(gray, state)


def test_imagenet_cache_file_that_runs_code_is_refused_unrun(torch_home, tmp_path):
    marker = tmp_path / "code-ran"
    path = torch_home / "hub" / "checkpoints" / expected_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": RunsCode(str(marker))}, path)
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights="imagenet")
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_imagenet_cache_file_of_another_model_is_an_input_error(torch_home):
    path = torch_home / "hub" / "checkpoints" / expected_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights="imagenet")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --- weights from files -------------------------------------------------------------------------


def test_plain_state_dict_file(tmp_path):
    state = random_resnet18_state()
    path = tmp_path / "plain.pth"
    torch.save(state, path)

    new_head = get_model("resnet18", num_classes=4, weights=str(path))
    assert_backbone_equal(new_head, state, skip=("fc.",))
    assert new_head.fc.out_features == 4


def test_wrapped_and_prefixed_state_dicts(tmp_path):
    state = random_resnet18_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    model = get_model("resnet18", num_classes=4, weights=str(tmp_path / "ddp.pth"))
    assert_backbone_equal(model, state, skip=("fc.",))


def test_stem_summed_for_one_channel_and_spread_for_three(tmp_path):
    state = random_resnet18_state()
    torch.save(state, tmp_path / "rgb.pth")
    gray = get_model("resnet18", num_classes=10, in_chans=1, weights=str(tmp_path / "rgb.pth"))
    expected = state["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(gray.conv1.weight.detach(), expected)
    assert_backbone_equal(gray, state)

    # and back: a 1-channel file into a 3-channel model gives kernels that sum to the original
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    rgb = get_model("resnet18", num_classes=10, in_chans=3, weights=str(tmp_path / "gray.pth"))
    assert rgb.conv1.weight.shape == (64, 3, 7, 7)
    torch.testing.assert_close(rgb.conv1.weight.detach().sum(dim=1, keepdim=True), expected)


def test_edgeft_checkpoint_with_another_class_count(tmp_path):
    torch.manual_seed(1)
    source = get_model("resnet18", num_classes=4)
    for module in source.modules():  # distinctive BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    path = tmp_path / "src.pt"
    save_checkpoint(path, edgeft_checkpoint_content(source, arch="resnet18", num_classes=4))
    state = source.state_dict()

    model = get_model("resnet18", num_classes=6, weights=str(path))
    assert_backbone_equal(model, state, skip=("fc.",))
    assert model.fc.weight.shape == (6, 512) and model.fc.bias.shape == (6,)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 6)


def test_edgeft_checkpoint_of_another_architecture_is_refused(tmp_path):
    source = get_model("mobilenet_v3_small", num_classes=3)
    path = tmp_path / "mobile.pt"
    save_checkpoint(path, edgeft_checkpoint_content(source, arch="mobilenet_v3_small", num_classes=3))
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights=str(path))
    assert "mobilenet_v3_small" in str(info.value)


@pytest.mark.parametrize("other", ["mobilenet_v3_small", "resnet34"])  # resnet34 holds every resnet18 key, and more
def test_state_dict_of_another_architecture_is_refused(tmp_path, other):
    torch.save(torchvision.models.get_model(other).state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights=str(tmp_path / "other.pth"))
    assert "another architecture" in str(info.value)


def test_pickle_of_a_custom_object_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"conv1.weight": NotATensor()}, path)
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights=str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pkl"
    with path.open("wb") as f:
        pickle.dump({"conv1.weight": RunsCode(str(marker))}, f)
    with pytest.raises(InputError):
        load_weights_file(path)
    with pytest.raises(InputError):
        get_model("resnet18", num_classes=3, weights=str(path))
    assert not marker.exists()


def test_missing_and_non_tensor_weight_files(tmp_path):
    with pytest.raises(InputError) as info:
        get_model("resnet18", num_classes=3, weights=str(tmp_path / "absent.pth"))
    assert "absent.pth" in str(info.value)
    torch.save({"a": [1, 2]}, tmp_path / "lists.pth")
    with pytest.raises(InputError):
        load_weights_file(tmp_path / "lists.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(InputError):
        load_weights_file(tmp_path / "text.pth")


# --- freezing -----------------------------------------------------------------------------------


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = get_model("resnet18", num_classes=3)
    freeze_backbone(model, True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    freeze_backbone(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_bn_eval_keeps_running_statistics():
    model = get_model("resnet18", num_classes=3)
    model.train()
    backbone_bn_eval(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()  # and without it they do move: the check above can fail
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before["bn1.running_mean"], model.state_dict()["bn1.running_mean"])


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_small"])
def test_small_stem_keeps_small_images_large(name):
    model = get_model(name, num_classes=4, in_chans=1, stem="small").eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    features = {}
    conv.register_forward_hook(lambda module, args, out: features.update(shape=out.shape))
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
    assert features["shape"][-1] == 32  # torchvision's stride-2 stem would have made it 16


def test_small_stem_loads_the_rest_of_a_checkpoint(tmp_path):
    source = get_model("resnet18", num_classes=3)
    path = tmp_path / "r18.pt"
    save_checkpoint(path, edgeft_checkpoint_content(source, arch="resnet18", num_classes=3))
    model = get_model("resnet18", num_classes=5, stem="small", weights=str(path))
    assert model.conv1.kernel_size == (3, 3)
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
