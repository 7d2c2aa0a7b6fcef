"""Atomic folders: the target appears whole on success, and neither it nor a temporary folder is left on failure."""
import pytest

from nsync_jax.errors import UserError
from nsync_jax.files import atomic_folder


def test_atomic_folder_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "parent" / "model"
    with atomic_folder(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".model.tmp-")
        (temporary / "weights.bin").write_text("done")
        assert not target.exists()  # nothing under the real name before the block ends
    assert (target / "weights.bin").read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]

    failed = tmp_path / "parent" / "failed"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_folder(failed) as temporary:
            (temporary / "half.bin").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in failed.parent.iterdir()) == ["model"]


def test_atomic_folder_refuses_an_existing_target_unless_told_to_replace(tmp_path):
    (tmp_path / "model" / "old.bin").parent.mkdir()
    (tmp_path / "model" / "old.bin").write_text("old")
    with pytest.raises(UserError, match=f"{tmp_path / 'model'}: already exists; pick another"):
        with atomic_folder(tmp_path / "model", exists_hint="pick another"):
            pytest.fail("the block must not run")
    assert (tmp_path / "model" / "old.bin").read_text() == "old"

    with atomic_folder(tmp_path / "model", replace=True) as temporary:
        (temporary / "new.bin").write_text("new")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
