"""The toy-world editing benchmark's ground truth and scoring, without a diffusion model: a render of the edited
scene must score as a perfect edit, the unedited input as none."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_edit_toyworld as bench  # noqa: E402

from nsync_jax.toyworld import judge as judge_lib  # noqa: E402
from nsync_jax.toyworld import world  # noqa: E402
from nsync_jax.toyworld.demo import BUNDLED_JUDGE  # noqa: E402


def test_edits_swap_one_attribute_of_a_one_shape_scene():
    edits = bench.sample_edits(0, 3, 2, "flat")
    assert edits == bench.sample_edits(0, 3, 2, "flat")
    assert [e.attribute for e in edits] == ["colour"] * 3 + ["shape"] * 2
    for e in edits:
        field = bench.ATTRIBUTES[e.attribute]
        assert getattr(e.scene, field) == (e.source,) and getattr(e.edited_scene, field) == (e.target,)
        assert e.source != e.target and len(e.scene.shapes) == 1
        other = bench.ATTRIBUTES[bench.OTHER[e.attribute]]
        assert getattr(e.edited_scene, other) == getattr(e.scene, other)


def test_banks_differ_only_in_the_word(tmp_path):
    bench.write_banks(tmp_path, 0, "flat")
    red, blue = ((tmp_path / f"{w}.txt").read_text().splitlines() for w in ("red", "blue"))
    assert len(red) == bench.BANK_SIZE
    assert [s.replace("red", "blue") for s in red] == blue


def test_edit_region_holds_every_changed_pixel():
    for edit in bench.sample_edits(1, 4, 4, "flat"):
        changed = (world.render(edit.scene) != world.render(edit.edited_scene)).any(-1)
        region = bench.edit_region(edit, 64)
        assert changed.any() and not (changed & ~region).any()
        assert region.mean() < 0.6  # the background is still most of the image


def test_rendered_edits_score_as_perfect_and_inputs_as_none():
    judge = judge_lib.load_judge(BUNDLED_JUDGE)
    edits = bench.sample_edits(0, 6, 4, "flat")
    inputs = world.render_batch([e.scene for e in edits])
    perfect = bench.score(judge, edits, inputs, world.render_batch([e.edited_scene for e in edits]))
    untouched = bench.score(judge, edits, inputs, inputs)
    assert np.mean([r["all"] for r in perfect]) >= 0.8  # the judge's own errors on shapes
    assert all(r["background_change"] == 0 for r in perfect + untouched)
    assert not any(r["success"] for r in untouched)
