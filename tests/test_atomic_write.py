"""codec.atomic_write, through which every file of the project is written: a write that fails part-way
leaves the old file as it was and no temporary beside it."""
import pytest
import torch

from codec import atomic_write, load_pt, write_text
from speechalign import save_checkpoint


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_write_creates_its_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "new" / "deeper" / "x.txt"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["x.txt"]


def test_a_checkpoint_that_cannot_be_saved_leaves_the_old_one_loadable(tmp_path):
    """torch.save fails part-way through an unpicklable value: before the shared helper, save_checkpoint left
    its half-written ar.pt.tmp behind."""
    path = tmp_path / "ar.pt"
    save_checkpoint(path, step=1, model={"w": torch.ones(3)})
    with pytest.raises(Exception):
        save_checkpoint(path, step=2, model={"w": torch.zeros(3)}, hook=lambda: None)  # a lambda: not picklable
    assert load_pt(path, "checkpoint")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ar.pt"]
