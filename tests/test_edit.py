"""Zero-shot editing: the pieces against diffusers and the formulas, the guidance step, and the `edit` command
end to end on a tiny random model.

The zerocon command-line tests share one compiled program (3 steps, two 32 px images in one batch), so only
the first of them compiles it.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from conftest import SD_SCHEDULE
from nsync_jax import schedulers
from nsync_jax.cli import main
from nsync_jax.editing import directions, zerocon
from nsync_jax.editing.inversion import NoiseRegularization, auto_correlation_loss, kl_loss, \
    regularize_noise
from nsync_jax.editing.losses import cut_loss, patch_nce
from nsync_jax.models.unet import load_unet
from nsync_jax.pipeline import load_pipeline

STEPS = "3"
BATCH = ["--batch-size", "2"]  # both test images in one compiled call


def relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(reference)).max() / np.abs(np.asarray(reference)).max())


# ------------------------------------------------------------------------------------------------------------
# DDIM inversion.
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(SD_SCHEDULE, _class_name="PNDMScheduler", skip_prk_steps=True),  # SD 1.x: clip_sample defaults to True
    dict(SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction"),  # SD 2.x
    dict(SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0),
])
def test_ddim_inversion_step_matches_diffusers(config):
    from diffusers import DDIMInverseScheduler

    for steps in (7, 50):
        ours = schedulers.DDIMInverseSampler(config, steps)
        reference = DDIMInverseScheduler.from_config(config)
        reference.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
        rng = np.random.default_rng(steps)
        for index, timestep in enumerate(reference.timesteps):
            sample, output = rng.standard_normal((2, 1, 4, 6, 6)).astype(np.float32)
            expected = reference.step(torch.from_numpy(output), int(timestep), torch.from_numpy(sample)).prev_sample
            mine = ours.step(jnp.asarray(output), index, jnp.asarray(sample))
            assert relative_error(mine, expected.numpy()) <= 1e-4


def test_noise_regularization_whitens_correlated_noise():
    key = jax.random.key(0)
    white = jax.random.normal(key, (16, 16, 4))
    correlated = 0.6 * (white + jnp.roll(white, 1, axis=0) + jnp.roll(white, 1, axis=1)) + 0.3
    regularized = jax.jit(lambda x: regularize_noise(x, lambda out: out, key, NoiseRegularization()))(correlated)
    assert kl_loss(regularized) < 0.5 * kl_loss(correlated)
    assert auto_correlation_loss(regularized, key) < 0.5 * auto_correlation_loss(correlated, key)


# ------------------------------------------------------------------------------------------------------------
# Recorded attention and the losses.
# ------------------------------------------------------------------------------------------------------------

class RecordingProcessor:
    """An attention processor that computes attention as diffusers' `Attention` helpers do and keeps the
    probabilities `(batch * heads, queries, keys)`."""

    def __init__(self, records):
        self.records = records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.records.append(probs.detach().numpy())
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_cross_attention_probs_match_diffusers(family, request):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    folder = request.getfixturevalue(f"{family}_dir") / "unet"
    torch_unet = UNet2DConditionModel.from_pretrained(folder).eval()
    records = []
    torch_unet.set_attn_processor({name: RecordingProcessor(records) if ".attn2." in name else AttnProcessor()
                                   for name in torch_unet.attn_processors})
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 16, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(sample), 321, torch.from_numpy(context)).sample.numpy()

    unet = load_unet(folder)
    graphdef, state = nnx.split(unet)
    recording_graphdef = zerocon.recording_graphdef(unet, features=True)
    forward = jax.jit(lambda state, x, c: zerocon.recorded_forward(nnx.merge(recording_graphdef, state), x, 321, c))
    recording = forward(state, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(context))
    assert relative_error(np.asarray(recording.prediction).transpose(0, 3, 1, 2), expected) <= 1e-4
    assert len(recording.probs) == len(records) == sum(".attn2." in name for name in torch_unet.attn_processors)
    for ours, theirs in zip(recording.probs, records):
        batch, heads, queries, tokens = ours.shape
        assert relative_error(np.asarray(ours).reshape(batch * heads, queries, tokens), theirs) <= 1e-4
    # The up blocks' self-attention outputs, laid out spatially: the tiny UNet's last two levels.
    per_level = len(recording.features) // 2
    assert [f.shape for f in recording.features] == [(2, 8, 8, 16)] * per_level + [(2, 16, 16, 8)] * per_level
    assert not unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2.record_probs  # the model is untouched


def numpy_patch_nce(queries, keys, temperature):
    """The PatchNCE formula, written out: per image and patch i, -log of exp(q_i.k_i / t) over itself plus
    exp(q_i.k_j / t) for j != i plus exp(-10 / t) for the masked own position."""
    unit = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-7)
    queries, keys = unit(queries), unit(keys)
    losses = np.zeros(len(queries))
    for b in range(len(queries)):
        for i in range(queries.shape[1]):
            logits = keys[b] @ queries[b, i] / temperature
            positive = np.exp(logits[i])
            denominator = positive + np.exp(np.delete(logits, i)).sum() + np.exp(-10.0 / temperature)
            losses[b] -= np.log(positive / denominator) / queries.shape[1]
    return losses


def test_patch_nce_matches_the_formula_and_finite_differences():
    rng = np.random.default_rng(0)
    queries, keys = rng.standard_normal((2, 2, 6, 5))
    with jax.enable_x64(True):
        ours = patch_nce(jnp.asarray(queries), jnp.asarray(keys), 0.07)
        assert np.abs(np.asarray(ours) - numpy_patch_nce(queries, keys, 0.07)).max() <= 1e-5 * np.abs(ours).max()

        gradient = np.asarray(jax.grad(lambda q: patch_nce(q, jnp.asarray(keys), 0.07).sum())(jnp.asarray(queries)))
        finite = np.zeros_like(queries)
        for index in np.ndindex(queries.shape):
            step = np.zeros_like(queries)
            step[index] = 1e-6
            finite[index] = (numpy_patch_nce(queries + step, keys, 0.07)
                             - numpy_patch_nce(queries - step, keys, 0.07)).sum() / 2e-6
        assert np.abs(gradient - finite).max() <= 1e-5 * np.abs(finite).max()
        # No gradient reaches the reference features.
        key_gradient = jax.grad(lambda k: patch_nce(jnp.asarray(queries), k, 0.07).sum())(jnp.asarray(keys))
        assert not np.asarray(key_gradient).any()

        # With at least as many patches as positions every position is used, and the order does not matter:
        # cut_loss is then the formula on the pooled maps (a 5x6 map gives 2x3 patches of size 2).
        edit, reference = rng.standard_normal((2, 1, 5, 6, 3))
        pooled = lambda x: x[:, :4].reshape(1, 2, 2, 3, 2, 3).mean(axis=(2, 4)).reshape(1, 6, 3)
        expected = (numpy_patch_nce(edit.reshape(1, 30, 3), reference.reshape(1, 30, 3), 0.07)
                    + numpy_patch_nce(pooled(edit), pooled(reference), 0.07))
        mine = cut_loss([jnp.asarray(edit)], [jnp.asarray(reference)], jax.random.split(jax.random.key(0), 1))
        assert np.abs(np.asarray(mine) - expected).max() <= 1e-5 * expected.max()


def test_guidance_step_lowers_the_cross_attention_loss(sd1_dir):
    pipe = load_pipeline(sd1_dir)
    caption, edit = directions.encode_prompts(pipe, ["a photo of a cat", "a photo of a dog"])
    graphdef, state = nnx.split(pipe.unet)
    recording_graphdef = zerocon.recording_graphdef(pipe.unet, features=False)
    rng = np.random.default_rng(0)
    reference_latents, latents = rng.standard_normal((2, 1, 16, 16, 4)).astype(np.float32)

    @jax.jit
    def reference_and_step(state, latents):
        unet = nnx.merge(recording_graphdef, state)
        reference = zerocon.recorded_forward(unet, jnp.asarray(reference_latents), 500, caption[None])
        weights = zerocon.GuidanceWeights(jnp.float32(0.1), jnp.float32(0.0), jnp.float32(5.0))
        return zerocon.guidance_step(unet, latents, 500, edit[None], reference, jax.random.split(jax.random.key(0), 1),
                                     weights, None)

    moved, (before, _), _ = reference_and_step(state, latents)
    _, (after, _), _ = reference_and_step(state, moved)
    assert 0 < after[0] < before[0]
    assert not np.allclose(moved, latents)


def test_word_directions_are_encoded_once(sd1_dir, tmp_path, monkeypatch):
    pipe = load_pipeline(sd1_dir)
    banks = tmp_path / "banks"
    banks.mkdir()
    (banks / "cat.txt").write_text("a photo of a cat\n\na red cat\n")
    (banks / "dog.txt").write_text("a photo of a dog\na blue dog\na dog in the style of painting\n")
    encode = directions.encode_prompts
    expected = encode(pipe, ["a photo of a dog", "a blue dog", "a dog in the style of painting"]).mean(axis=0) \
        - encode(pipe, ["a photo of a cat", "a red cat"]).mean(axis=0)
    calls = []
    monkeypatch.setattr(directions, "encode_prompts",
                        lambda pipe, prompts: calls.append(prompts) or encode(pipe, prompts))
    for _ in range(2):
        delta, provenance = directions.word_direction(pipe, "cat", "dog", banks=banks, cache_dir=banks)
        np.testing.assert_allclose(delta, expected, atol=1e-6)
    assert len(calls) == 2  # one per bank, the second time from the cache
    assert provenance["source"]["bank"] == str(banks / "cat.txt") and provenance["target"]["sentences"] == 3
    assert len(list(banks.glob("*.npy"))) == 2
    # A changed bank is encoded again.
    (banks / "cat.txt").write_text("a photo of a cat\n")
    directions.word_direction(pipe, "cat", "dog", banks=banks, cache_dir=banks)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------------------
# The edit command.
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 32 px pictures: a red disc on blue and a blue square on red."""
    folder = tmp_path_factory.mktemp("images")
    y, x = np.mgrid[:32, :32]
    disc = ((y - 16) ** 2 + (x - 16) ** 2 < 80)[..., None]
    square = ((abs(y - 14) < 8) & (abs(x - 18) < 8))[..., None]
    Image.fromarray(np.where(disc, [220, 40, 30], [30, 60, 200]).astype(np.uint8)).save(folder / "disc.png")
    Image.fromarray(np.where(square, [20, 40, 230], [200, 50, 40]).astype(np.uint8)).save(folder / "square.png")
    return folder


def run_edit(capsys, *args):
    code = main(["edit", *map(str, args)])
    return code, capsys.readouterr().err


def read(path):
    return np.asarray(Image.open(path))


def test_edit_command_writes_reproducible_edits(sd1_dir, images, tmp_path, capsys):
    for name in ("a", "b"):
        code, err = run_edit(capsys, "--model", sd1_dir, "--image", images, "--source", "cat", "--target", "dog",
                             "--caption", "a photo of a cat", "--steps", STEPS, "--seed", 3, *BATCH,
                             "--output", tmp_path / name)
        assert code == 0, err
    for stem in ("disc", "square"):
        names = sorted(p.name for p in (tmp_path / "a" / stem).iterdir())
        assert names == ["attention.png", "edit.json", "edited.png", "reconstruction.png"]
        for name in ("attention.png", "edited.png", "reconstruction.png"):
            assert (tmp_path / "a" / stem / name).read_bytes() == (tmp_path / "b" / stem / name).read_bytes(), name
        record, again = (json.loads((tmp_path / run / stem / "edit.json").read_text()) for run in ("a", "b"))
        assert record["losses"] == again["losses"] and record["settings"] == again["settings"]
        assert record["caption"] == "a photo of a cat" and record["settings"]["method"] == "zerocon"
        assert record["direction"]["source"]["bank"] == "templates"
        assert record["attention_map"]["reference_words"] == ["cat"]
        losses = record["losses"]
        assert len(losses["cross_attention"]) == len(losses["contrastive"]) == int(STEPS)
        assert all(v > 0 for v in losses["cross_attention"] + losses["contrastive"])
        assert read(tmp_path / "a" / stem / "edited.png").shape == (32, 32, 3)
        assert np.abs(read(tmp_path / "a" / stem / "edited.png").astype(int)
                      - read(tmp_path / "a" / stem / "reconstruction.png")).max() > 10
        assert read(tmp_path / "a" / stem / "attention.png").shape == (32, 64, 3)
    assert len(list((tmp_path / "a" / "directions").glob("*.npy"))) == 2


def test_identity_edit_reproduces_the_reconstruction(sd1_dir, images, tmp_path, capsys):
    code, err = run_edit(capsys, "--model", sd1_dir, "--image", images, "--source", "cat", "--target", "cat",
                         "--xa-guidance", 0, "--cut-weight", 0, "--caption", "a photo of a cat", "--steps", STEPS,
                         *BATCH, "--output", tmp_path)
    assert code == 0, err
    for stem in ("disc", "square"):
        np.testing.assert_array_equal(read(tmp_path / stem / "edited.png"),
                                      read(tmp_path / stem / "reconstruction.png"))


def test_edit_with_a_captioner(sd1_dir, images, tmp_path, capsys):
    from test_negatives import build_tiny_blip

    blip = build_tiny_blip(tmp_path / "blip")
    code, err = run_edit(capsys, "--model", sd1_dir, "--image", images, "--source", "cat", "--target", "dog",
                         "--captioner", blip, "--steps", STEPS, *BATCH, "--output", tmp_path / "out")
    assert code == 0, err
    for stem in ("disc", "square"):
        caption = json.loads((tmp_path / "out" / stem / "edit.json").read_text())["caption"]
        assert caption and caption == caption.strip()


def test_sdedit_towards_a_target_prompt(sd1_dir, images, tmp_path, capsys):
    code, err = run_edit(capsys, "--model", sd1_dir, "--image", images / "disc.png", "--method", "sdedit",
                         "--target-prompt", "a photo of a dog", "--caption", "a photo of a cat", "--strength", 0.6,
                         "--steps", 5, "--output", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edited.png", "reconstruction.png"]
    record = json.loads((tmp_path / "edit.json").read_text())
    assert record["direction"] == {"kind": "target prompt", "target_prompt": "a photo of a dog"}
    assert record["losses"] is None and record["settings"]["strength"] == 0.6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["zerocon", "pix2pix-zero"])
def test_host_reference_matches_recomputed_reference(sd1_dir, images, tmp_path, capsys, method):
    for reference in ("recompute", "host"):
        code, err = run_edit(capsys, "--model", sd1_dir, "--image", images, "--source", "cat", "--target", "dog",
                             "--caption", "a photo of a cat", "--steps", STEPS, "--method", method, "--reference",
                             reference, *BATCH, "--output", tmp_path / reference)
        assert code == 0, err
    for stem in ("disc", "square"):
        recomputed = json.loads((tmp_path / "recompute" / stem / "edit.json").read_text())["losses"]
        hosted = json.loads((tmp_path / "host" / stem / "edit.json").read_text())["losses"]
        # The host keeps the reference in bfloat16.
        np.testing.assert_allclose(hosted["cross_attention"], recomputed["cross_attention"], rtol=0.05, atol=1e-3)
        hosted_image, recomputed_image = (read(tmp_path / run / stem / "edited.png").astype(int)
                                          for run in ("host", "recompute"))
        assert np.abs(hosted_image - recomputed_image).max() <= 8
        np.testing.assert_array_equal(read(tmp_path / "host" / stem / "reconstruction.png"),
                                      read(tmp_path / "recompute" / stem / "reconstruction.png"))


def test_user_errors_are_one_line(sd1_dir, images, tmp_path, capsys):
    base = ["--model", sd1_dir, "--steps", STEPS, "--output", tmp_path / "out"]
    word_edit = ["--source", "cat", "--target", "dog"]

    code, err = run_edit(capsys, *base, *word_edit, "--caption", "a cat", "--image", tmp_path / "missing.png")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'missing.png'}: image not found" in err

    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, err = run_edit(capsys, *base, *word_edit, "--caption", "a cat", "--image", tmp_path / "broken.png")
    assert code == 2 and f"{tmp_path / 'broken.png'}: cannot read the image" in err

    Image.new("RGB", (33, 32)).save(tmp_path / "odd.png")
    code, err = run_edit(capsys, *base, *word_edit, "--caption", "a cat", "--image", tmp_path / "odd.png")
    assert code == 2 and f"{tmp_path / 'odd.png'}: size 33x32 is not divisible by 2; pass --resolution N" in err

    code, err = run_edit(capsys, *base, *word_edit, "--caption", "  ", "--image", images / "disc.png")
    assert code == 2 and "--caption: the caption is empty" in err

    code, err = run_edit(capsys, *base, *word_edit, "--image", images / "disc.png")
    assert code == 2 and "--caption TEXT or a captioner with --captioner DIR" in err

    (tmp_path / "banks").mkdir()
    (tmp_path / "banks" / "cat.txt").write_text("a photo of a cat\n")
    code, err = run_edit(capsys, *base, *word_edit, "--caption", "a cat", "--image", images / "disc.png",
                         "--directions", tmp_path / "banks")
    assert code == 2 and f"{tmp_path / 'banks' / 'dog.txt'}: no sentence bank for 'dog'" in err

    code, err = run_edit(capsys, *base, "--source", "cat", "--caption", "a cat", "--image", images / "disc.png")
    assert code == 2 and "either --source WORD and --target WORD, or --target-prompt TEXT" in err

    code, err = run_edit(capsys, *base, *word_edit, "--caption", "a cat", "--image", images / "disc.png",
                         "--method", "pix2pix-zero", "--cut-weight", 1)
    assert code == 2 and "--cut-weight must be 0 with --method pix2pix-zero" in err
    assert not (tmp_path / "out").exists()
