"""edgeft.checkpoint: atomic saves and weights-only loads."""

from __future__ import annotations

import pickle

import pytest
import torch

import edgeft.checkpoint as ckpt
from edgeft.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from edgeft.errors import InputError


def content(value: float = 1.0) -> dict:
    return {
        "arch": "resnet18",
        "num_classes": 3,
        "in_chans": 1,
        "classes": ["a", "b", "c"],
        "preprocess": {
            "size": 16,
            "resize": 18,
            "mean": [0.5],
            "std": [0.25],
            "channels": 1,
            "interpolation": "bilinear",
        },
        "state_dict": {"fc.weight": torch.full((3, 4), value), "fc.bias": torch.arange(3.0)},
        "metrics": {"val_acc": 0.5, "epoch": 2},
        "resume": {"epoch": 2, "rng_cpu": torch.get_rng_state(), "history": [{"epoch": 1, "phase": "all"}]},
    }


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def assert_same(loaded: dict, original: dict) -> None:
    assert loaded["format"] == FORMAT
    for key in ("arch", "num_classes", "in_chans", "classes", "preprocess", "metrics"):
        assert loaded[key] == original[key]
    for key, value in original["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert torch.equal(loaded["resume"]["rng_cpu"], original["resume"]["rng_cpu"])
    assert loaded["resume"]["history"] == original["resume"]["history"]


def test_round_trip(tmp_path):
    path = tmp_path / "best.pt"
    assert save_checkpoint(path, content()) == path
    assert_same(load_checkpoint(path), content())
    raw = torch.load(path, weights_only=True)  # plain torch can read it safely too
    assert raw["format"] == FORMAT
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_content(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, content(1.0))
    save_checkpoint(path, content(2.0))
    assert torch.equal(load_checkpoint(path)["state_dict"]["fc.weight"], torch.full((3, 4), 2.0))
    assert leftovers(tmp_path) == []


def test_incomplete_content_is_not_written(tmp_path):
    partial = content()
    del partial["classes"]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.pt", partial)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(path, content(1.0))
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the temporary file ...
        f.truncate(f.tell() // 2)
        raise error  # ... then the disk fills up or the user presses Ctrl-C

    monkeypatch.setattr(ckpt.torch, "save", save_then_fail)
    with pytest.raises(type(error)):
        save_checkpoint(path, content(2.0))
    monkeypatch.undo()

    assert_same(load_checkpoint(path), content(1.0))
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(ckpt.torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "best.pt", content())
    assert list(tmp_path.iterdir()) == []


# --- refusals -----------------------------------------------------------------------------------


class Opaque:
    def __init__(self):
        self.x = 1


def assert_refused(path, *words: str) -> str:
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "absent.pt", "not exist")


def test_plain_state_dict_is_not_an_edgeft_checkpoint(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")
    assert_refused(tmp_path / "plain.pt", "not an edgeft checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert_refused(tmp_path / "list.pt", "not an edgeft checkpoint")
    torch.save({**content(), "format": "edgeft.checkpoint/99"}, tmp_path / "future.pt")
    assert_refused(tmp_path / "future.pt", "edgeft.checkpoint/99")


def test_incomplete_checkpoint(tmp_path):
    partial = {"format": FORMAT, **content()}
    del partial["state_dict"]
    torch.save(partial, tmp_path / "partial.pt")
    assert_refused(tmp_path / "partial.pt", "state_dict")


def test_pickle_with_objects_is_refused(tmp_path):
    torch.save({**content(), "format": FORMAT, "extra": Opaque()}, tmp_path / "objects.pt")
    message = assert_refused(tmp_path / "objects.pt", "weights-only")
    assert "Opaque" in message  # the reason names what was refused
    assert "weights_only` set to `False`" not in message  # and does not advise the unsafe load


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with (tmp_path / "evil.pt").open("wb") as f:
        pickle.dump({"format": FORMAT, "state_dict": RunsCode()}, f)
    assert_refused(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, content())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        broken = tmp_path / f"cut{cut}.pt"
        broken.write_bytes(data[:cut])
        assert_refused(broken)


def test_empty_and_text_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_refused(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    message = assert_refused(tmp_path / "notes.pt")
    assert "()" not in message  # a reason is given


def test_a_folder_or_a_fifo_is_named_for_what_it_is(tmp_path):
    import os

    (tmp_path / "runs.pt").mkdir()
    os.mkfifo(tmp_path / "pipe.pt")  # opening it would block: it must never be opened
    with pytest.raises(InputError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path / "runs.pt")
    with pytest.raises(InputError, match="is not a regular file"):
        load_checkpoint(tmp_path / "pipe.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
