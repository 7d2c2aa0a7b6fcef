"""The toy world: deterministic renders and captions, the committed judge's accuracy, FID/KID arithmetic."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest

from nsync_jax.errors import UserError
from nsync_jax.toyworld import world
from nsync_jax.toyworld.world import ALL_STYLES, HELD_OUT_STYLES, SEEN_STYLES, Scene

# Scenes the judge never trained or was evaluated on (training uses seed 0, its evaluation seed 1).
TEST_SEED = 20261202


def test_sampling_is_a_function_of_the_seed():
    assert world.sample_scenes(3, 50) == world.sample_scenes(3, 50)
    assert world.sample_scenes(3, 50) != world.sample_scenes(4, 50)
    for scene in world.sample_scenes(3, 200, styles=ALL_STYLES):
        assert 1 <= len(scene.shapes) == len(scene.colours) == len(scene.layout) <= 2
        assert len(set(scene.shapes)) == len(scene.shapes)
        assert scene.style in ALL_STYLES and scene.background in world.BACKGROUNDS


def test_held_out_styles_never_appear_by_default():
    styles = {scene.style for scene in world.sample_scenes(0, 2000)}
    assert styles == set(SEEN_STYLES)
    assert {scene.style for scene in world.sample_scenes(0, 300, styles=HELD_OUT_STYLES)} == set(HELD_OUT_STYLES)
    with pytest.raises(ValueError, match="drawing"):
        world.sample_scenes(0, 1, styles=(world.GENERIC_STYLE,))


def test_two_shape_share_sets_the_share_and_none_keeps_the_old_draw():
    counts = [len(s.shapes) for s in world.sample_scenes(0, 4000, two_shape_share=0.65)]
    assert abs(np.mean(np.array(counts) == 2) - 0.65) < 0.03
    assert {len(s.shapes) for s in world.sample_scenes(0, 200, two_shape_share=0.0)} == {1}
    assert world.sample_scenes(0, 50, two_shape_share=None) == world.sample_scenes(0, 50)
    for bad in ({"two_shape_share": 1.5}, {"two_shape_share": 0.5, "max_shapes": 1}):
        with pytest.raises(ValueError, match="two_shape_share"):
            world.sample_scenes(0, 1, **bad)


def test_grain_comes_in_cells_of_three_pixels():
    scene = Scene(("square",), ("blue",), "white", "grainy", ((0.5, 0.5, 0.5, 0.0),))
    grain = world.render(scene).astype(float) - world.render(dataclasses.replace(scene, style="flat"))
    corner = grain[:12, :12, 0]  # background: away from the shape, grain alone
    assert np.abs(corner).max() > 5
    cells = corner.reshape(4, 3, 4, 3)
    assert np.abs(cells - cells[:, :1, :, :1]).max() <= 1  # constant within each 3x3 cell, but for rounding


def test_render_is_deterministic_with_shape_and_dtype():
    scenes = world.sample_scenes(5, 30, styles=ALL_STYLES)
    scenes.append(dataclasses.replace(scenes[0], style="grainy"))  # per-pixel noise, seeded from the scene
    for size in (64, 128):
        first, second = world.render_batch(scenes, size), world.render_batch(scenes, size)
        assert first.shape == (len(scenes), size, size, 3) and first.dtype == np.uint8
        assert first.tobytes() == second.tobytes()
    assert world.render(scenes[0]).tobytes() != world.render(scenes[1]).tobytes()


def test_captions():
    one = Scene(("star",), ("red",), "white", "dotted", ((0.5, 0.5, 0.5, 0.0),))
    two = Scene(("star", "circle"), ("red", "orange"), "black", "zigzag",
                ((0.3, 0.3, 0.35, 0.0), (0.7, 0.7, 0.35, 10.0)))
    assert world.content_caption(one) == "a red star on a white background"
    assert world.content_caption(two) == "a red star and an orange circle on a black background"
    assert world.caption(one) == "a red star on a white background in the style of dotted"
    assert world.caption(two, "<style>") == ("a red star and an orange circle on a black background "
                                             "in the style of <style>")


def test_styles_change_pixels_not_content():
    scene = Scene(("heart", "cross"), ("blue", "yellow"), "gray", "flat",
                  ((0.3, 0.35, 0.4, 5.0), (0.72, 0.68, 0.38, -8.0)))
    images = {style: world.render(dataclasses.replace(scene, style=style)).astype(np.float64)
              for style in ALL_STYLES}
    for a, b in itertools.combinations(ALL_STYLES, 2):
        assert np.abs(images[a] - images[b]).mean() > 2.0, (a, b)
    # Away from the shapes (beyond their circumscribed circles plus a pixel block) only grain touches the background.
    yy, xx = np.mgrid[:64, :64] + 0.5
    outside = np.ones((64, 64), bool)
    for x, y, size, _ in scene.layout:
        outside &= np.hypot(xx - x * 64, yy - y * 64) > 0.65 * size * 64 + 4
    for style, image in images.items():
        if style != "grainy":
            assert np.abs(image[outside] - world.BACKGROUNDS["gray"]).max() < 1, style


def test_framed_is_the_flat_fill_inside_a_line_of_another_shade():
    """`outlined`'s line, darker than the fill (lighter on black, where a dark line would vanish)."""
    square = Scene(("square",), ("blue",), "white", "flat", ((0.5, 0.5, 0.5, 0.0),))
    line = np.abs(world.render(dataclasses.replace(square, style="outlined")).astype(float)
                  - world.BACKGROUNDS["white"]).max(-1) > 30
    for background, darker in (("white", True), ("black", False)):
        flat = world.render(dataclasses.replace(square, background=background)).astype(float)
        framed = world.render(dataclasses.replace(square, background=background, style="framed")).astype(float)
        changed = np.abs(framed - flat).max(-1) > 30
        np.testing.assert_array_equal(changed, line)  # exactly the outline's pixels, nothing else
        np.testing.assert_array_equal(framed[~line], flat[~line])
        assert ((framed[line].sum(-1) < flat[line].sum(-1)).all() if darker
                else (framed[line].sum(-1) > flat[line].sum(-1)).all())


@pytest.fixture(scope="module")
def committed_judge():
    from nsync_jax.toyworld import judge

    return judge.load_judge(judge.ASSET_DIR)


def test_committed_judge_reads_fresh_renders(committed_judge):
    from nsync_jax.toyworld import judge

    scores = judge.evaluate_judge(committed_judge, TEST_SEED, count=300)
    for head in ("style", "shape", "colour", "background", "content"):
        assert scores[head] >= 0.95, scores
    held_out = world.sample_scenes(TEST_SEED + 1, 90, styles=HELD_OUT_STYLES)
    scores = judge.judge_scores(committed_judge, world.render_batch(held_out), held_out)
    assert min(scores.values()) >= 0.9, scores


def test_committed_judge_reads_softened_held_out_styles(committed_judge):
    """Generated images come through a VAE decoder, which softens them like a ~1 px blur; the judge must still
    name the held-out styles then (a judge trained on sharp renders alone called them all `gradient`)."""
    import jax

    from nsync_jax.toyworld import judge

    for style in HELD_OUT_STYLES:
        scenes = world.sample_scenes(TEST_SEED + 4, 40, styles=(style,))
        soft = judge.soften(world.render_batch(scenes).astype(np.float32) / 255, jax.random.key(0), fraction=1.0,
                            sigma=(1.0, 1.0))
        images = np.round(np.asarray(soft) * 255).astype(np.uint8)
        assert judge.judge_scores(committed_judge, images, scenes)["style"] >= 0.8, style


def test_committed_judge_reads_the_bundled_vaes_round_trips(committed_judge):
    """Every generated image is decoded by the bundled VAE, which lays its own fine texture over a flat fill;
    a judge trained without its round trips called 80% of round-tripped `flat` renders grainy or framed."""
    from nsync_jax.models.vae import load_vae
    from nsync_jax.toyworld import judge, pretrain

    vae = load_vae(pretrain.BUNDLED_MODEL / "vae")
    scenes = world.sample_scenes(TEST_SEED + 5, 240, styles=ALL_STYLES)
    images = judge.vae_round_trip(vae, world.render_batch(scenes))
    assert judge.judge_scores(committed_judge, images, scenes)["style"] >= 0.85
    flat = world.sample_scenes(TEST_SEED + 6, 40, styles=("flat",))
    images = judge.vae_round_trip(vae, world.render_batch(flat))
    assert judge.judge_scores(committed_judge, images, flat)["style"] >= 0.75


def test_soften_blurs_the_chosen_fraction():
    import jax
    from scipy.ndimage import gaussian_filter

    from nsync_jax.toyworld import judge

    images = np.random.default_rng(0).random((8, 32, 32, 3)).astype(np.float32)
    blurred = np.asarray(judge.soften(images, jax.random.key(0), fraction=1.0, sigma=(1.0, 1.0)))
    np.testing.assert_allclose(blurred, gaussian_filter(images, (0, 1, 1, 0), mode="nearest", truncate=3.0),
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(judge.soften(images, jax.random.key(0), fraction=0.0)), images)
    some = np.asarray(judge.soften(images, jax.random.key(1), fraction=0.5))
    changed = np.abs(some - images).max((1, 2, 3)) > 0
    assert 0 < changed.sum() < len(images)  # per image, not per batch


def test_judge_round_trip_and_fid(committed_judge, tmp_path):
    from nsync_jax.toyworld import judge

    judge.save_judge(committed_judge, tmp_path, {"note": "copy"})
    copy = judge.load_judge(tmp_path)
    images = world.render_batch(world.sample_scenes(TEST_SEED + 2, 40, styles=ALL_STYLES))
    np.testing.assert_array_equal(judge.logits(copy, images)["style"], judge.logits(committed_judge, images)["style"])
    [prediction] = judge.predict(copy, images[:1])
    assert set(prediction) == {"style", "shapes", "colours", "background"}
    same = judge.world_fid_kid(copy, images[:20], images[:20])
    assert abs(same["fid"]) < 1e-3
    flat = world.render_batch(world.sample_scenes(TEST_SEED + 3, 40, styles=("flat",)))
    assert judge.world_fid_kid(copy, images, flat)["fid"] > 1.0


def test_judge_command_checks_its_vae_before_rendering(tmp_path, capsys, monkeypatch):
    from nsync_jax.cli import main
    from nsync_jax.toyworld import judge

    monkeypatch.setattr(judge, "render_batch", lambda *a, **k: pytest.fail("rendered before checking --vae"))
    code = main(["toyworld", "judge", "--output", str(tmp_path / "judge"), "--vae", str(tmp_path / "no_vae")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "no_vae" in err
    assert not (tmp_path / "judge").exists()


def test_judge_records_the_bundled_vae_relative_to_the_checkout(tmp_path):
    from nsync_jax.toyworld import judge, pretrain

    assert judge._portable_path(pretrain.BUNDLED_MODEL / "vae") == "nsync_jax/toyworld/assets/sd-toyworld/vae"
    assert judge._portable_path(tmp_path / "vae") == str((tmp_path / "vae").resolve())


def test_load_judge_errors_name_the_file(committed_judge, tmp_path):
    from nsync_jax.toyworld import judge

    with pytest.raises(UserError, match=str(tmp_path / "missing")):
        judge.load_judge(tmp_path / "missing")
    folder = tmp_path / "judge"
    shutil.copytree(judge.ASSET_DIR, folder)
    (folder / "judge.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="judge.safetensors"):
        judge.load_judge(folder)
    shutil.copy(judge.ASSET_DIR / "judge.safetensors", folder / "judge.safetensors")
    config = json.loads((folder / "judge.json").read_text())
    config["style_classes"] = config["style_classes"][:-1]
    (folder / "judge.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="judge.json.*style_classes"):
        judge.load_judge(folder)
    (folder / "judge.json").write_text("{")
    with pytest.raises(UserError, match="judge.json"):
        judge.load_judge(folder)

