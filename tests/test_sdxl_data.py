"""SDXL's micro-conditioning of training images: each cropped image's original size and crop top-left reach the
UNet as its own `time_ids` (the mirror image's crop measured in the mirrored image, as diffusers' SDXL scripts
flip before cropping), negatives and anchors with theirs; squashed images keep the released script's
(res, res, 0, 0, res, res); the cached posteriors and their time_ids follow the crop; SD takes the same crops
and no time_ids."""
import io
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import tiny_config
from nsync_jax.data.style_dataset import crop_record, decode_image
from nsync_jax.pipeline import load_pipeline
from nsync_jax.schedulers import NoiseSchedule, add_noise, training_target
from nsync_jax.sdxl import SDXLConditioner, encode_prompt
from nsync_jax.train import data as train_data, methods, step as train_step, trainables
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)

RESOLUTION = 32
# (width, height) of each positive and of its negative: landscape and portrait, none of them square.
SIZES = [((48, 40), (64, 48)), ((40, 64), (56, 32))]


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sized_style_dir(tmp_path_factory):
    """Two positives and their negatives, each of its own non-square size."""
    root = tmp_path_factory.mktemp("sized_style")
    for sub in ("images", "captions", "negatives"):
        (root / sub).mkdir()
    for i, (positive, negative) in enumerate(SIZES):
        (root / "images" / f"item{i}.png").write_bytes(png(*positive, seed=i))
        (root / "negatives" / f"item{i}.png").write_bytes(png(*negative, seed=10 + i))
        (root / "captions" / f"item{i}.txt").write_text(["a red star", "a blue circle"][i])
    return root


@pytest.mark.parametrize("resize", ["random_crop", "center_crop"])
@pytest.mark.parametrize("width, height", [(40, 24), (24, 40)])
def test_the_crop_record_is_where_the_square_lies_in_the_short_side_resize(resize, width, height):
    """Original (height, width); the crop's (top, left) in the image resized to a short side of 12, where the
    decoded square is found; the mirror image's crop is where the mirrored square lies in the mirrored resize."""
    data, size = png(width, height, seed=3), 12
    scaled = (round(width * size / min(width, height)), round(height * size / min(width, height)))
    with Image.open(io.BytesIO(data)) as image:
        resized = np.asarray(image.resize(scaled, Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
    crops = set()
    for seed in range(4):
        record = crop_record(data, size, resize, crop_seed=[seed])
        (h, w, top, left), (h_m, w_m, top_m, left_m) = record.astype(int)
        assert (h, w) == (h_m, w_m) == (height, width) and top_m == top
        assert left_m == scaled[0] - size - left  # the same square, counted from the other side
        crops.add((top, left))
        if resize == "random_crop":  # cut from that very resize: the pixels are where the record says
            square = decode_image(data, size, resize, crop_seed=[seed])
            np.testing.assert_array_equal(square, resized[top:top + size, left:left + size])
            np.testing.assert_array_equal(square[:, ::-1], resized[:, ::-1][top_m:top_m + size, left_m:left_m + size])
        else:  # centred: the middle of the long side
            assert abs(top + left - (max(scaled) - size) / 2) <= 1
    assert len(crops) == 1 if resize == "center_crop" else len(crops) > 1  # random crops move with the seed


def test_a_squashed_image_is_recorded_as_the_released_script_conditions_it():
    np.testing.assert_array_equal(crop_record(png(48, 40, 0), 32, "squash"), [[32, 32, 0, 0]] * 2)


def sdxl_setup(sdxl_dir, style_dir, **overrides):
    """An NSYNC run's pieces on the tiny SDXL: config, prepared data, step spec, frozen weights, initial rows."""
    config = tiny_config(sdxl_dir, style_dir, **overrides)
    method = methods.get("nsync")
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    trainable = trainables.SDXL_EMBEDDINGS
    graphdefs, frozen, rows = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = train_data.prepare(pipe, train_data.read_style_dataset(config), config, config.placeholder_token)
    spec = train_step.StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                               pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable,
                               conditioner=SDXLConditioner())  # no spec.time_ids: the batch's are read
    return config, method, pipe, data, spec, frozen, rows


def expected_time_ids(style_dir, config, folder, stem, mirrored):
    data = (style_dir / folder / f"{stem}.png").read_bytes()
    record = crop_record(data, RESOLUTION, config.data.resize, [config.train.seed, zlib.crc32(stem.encode())])
    return np.concatenate([record[int(mirrored)], [RESOLUTION, RESOLUTION]])


def test_each_cropped_image_its_negative_and_its_anchor_carry_their_own_time_ids(sdxl_dir, sized_style_dir):
    config, method, _, data, _, _, _ = sdxl_setup(sdxl_dir, sized_style_dir, data__resize="random_crop")
    draw = train_data.draw_examples(data, 4, config.train.seed, 0, contrastive=True)
    batch = train_data.style_batch(data, draw)
    assert batch["time_ids"].shape == (3, 4, 6)
    stems = ["item0", "item1"]
    for g, (folder, index) in enumerate([("images", draw.index), ("negatives", draw.index),
                                         ("images", draw.anchor)]):
        for b in range(4):
            np.testing.assert_array_equal(batch["time_ids"][g, b], expected_time_ids(
                sized_style_dir, config, folder, stems[index[b]], draw.flips[g, b]))
    # Two images of different sizes: different original sizes in their time_ids.
    assert not np.array_equal(data.time_ids[0, 0, :2], data.time_ids[1, 0, :2])


def test_the_steps_loss_is_the_loss_with_each_images_own_time_ids(sdxl_dir, sized_style_dir):
    """The positive group's loss of an NSYNC step equals the loss computed by hand from the cached posteriors,
    both encoders and the UNet given the batch's time_ids, and differs from the loss with squashed time_ids."""
    config, method, pipe, data, spec, frozen, rows = sdxl_setup(sdxl_dir, sized_style_dir, data__resize="center_crop",
                                                                nsync__variant="orthogonal")  # no anchor group
    # A step whose positives are both images (of different sizes): per image, not one constant.
    step = next(s for s in range(50) if len(set(train_data.draw_examples(
        data, config.train.batch_size, config.train.seed, s, contrastive=True).index)) == 2)
    batch = {k: jnp.asarray(v) for k, v in method.batch(data, config, step=step).items()}
    assert not np.array_equal(batch["time_ids"][0, 0], batch["time_ids"][0, 1])
    key = jax.random.key(5)
    _, _, metrics = jax.jit(method.gradients(spec, config))(rows, frozen, batch, key)

    @jax.jit
    def hand_loss(time_ids):
        latents, noise, t = train_step.draw_latents(spec, jax.random.fold_in(key, 0), batch["mean"][0],
                                                    batch["logvar"][0])
        encoders = [nnx.merge(spec.graphdefs[name], frozen[name]) for name in ("text_encoder", "text_encoder_2")]
        context, pooled = encode_prompt(*encoders, batch["ids"][0, :, 0], batch["ids"][0, :, 1],
                                        extra_token_rows=(rows["text_encoder"], rows["text_encoder_2"]))
        unet = nnx.merge(spec.graphdefs["unet"], frozen["unet"])
        noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)
        prediction = unet(noisy, t, context, {"text_embeds": pooled, "time_ids": time_ids})
        return jnp.mean(jnp.square(prediction - training_target(spec.schedule, latents, noise, t)))

    assert float(metrics["loss"]) == pytest.approx(float(hand_loss(batch["time_ids"][0])), rel=1e-5)
    squashed = jnp.broadcast_to(jnp.asarray([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], jnp.float32),
                                (batch["time_ids"].shape[1], 6))
    assert abs(float(hand_loss(squashed)) - float(metrics["loss"])) > 1e-6 * abs(float(metrics["loss"]))


def test_squashed_images_keep_the_released_time_ids(sdxl_dir, sized_style_dir):
    config, method, _, data, _, _, _ = sdxl_setup(sdxl_dir, sized_style_dir)
    batch = method.batch(data, config, step=0)
    np.testing.assert_array_equal(batch["time_ids"],
                                  np.broadcast_to([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], (3, 2, 6)))


def test_the_cached_posteriors_and_their_time_ids_follow_the_crop(sdxl_dir, sized_style_dir):
    """The cache is made from the images as cropped: another crop (a random crop's seed, another resize)
    gives other posteriors and other time_ids, the same crop the same ones."""
    def cache(**overrides):
        _, _, _, data, _, _, _ = sdxl_setup(sdxl_dir, sized_style_dir, **overrides)
        return data.positives, data.time_ids, data.negatives, data.negative_time_ids

    first = cache(data__resize="random_crop", train__seed=0)
    jax.tree.map(np.testing.assert_array_equal, first, cache(data__resize="random_crop", train__seed=0))
    for other in (cache(data__resize="random_crop", train__seed=1), cache(data__resize="center_crop")):
        moved = ~np.all(other[1] == first[1], axis=-1)  # (N, 2): images whose crop moved
        assert moved.any()
        for n, m in zip(*np.nonzero(moved)):
            assert not np.array_equal(other[0][n, m], first[0][n, m])


def test_sd_crops_the_same_pixels_and_takes_no_time_ids(sd1_dir, sized_style_dir):
    """`data.resize` is the same crop on SD 1.x/2.x; the micro-conditioning has no input there, so an SD batch
    carries none, and an SD step given some refuses them rather than ignoring them."""
    config = tiny_config(sd1_dir, sized_style_dir, data__resize="random_crop")
    method = methods.get("nsync")
    pipe = load_pipeline(sd1_dir)
    trainable = trainables.EMBEDDINGS
    graphdefs, frozen, rows = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = train_data.prepare(pipe, train_data.read_style_dataset(config), config, config.placeholder_token)
    batch = method.batch(data, config, step=0)
    assert set(batch) == {"ids", "mean", "logvar"} and data.time_ids is None
    spec = train_step.StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                               pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable)
    batch["time_ids"] = np.zeros((3, 2, 6), np.float32)
    with pytest.raises(ValueError, match="time_ids"):
        method.gradients(spec, config)(rows, frozen, batch, jax.random.key(0))


# Three short runs (about a minute on 2 busy CPU cores): with `-m slow`.
@pytest.mark.slow
def test_a_run_on_random_crops_resumes_bit_identically(sdxl_dir, sized_style_dir, tmp_path):
    """`trainer.train` on SDXL with random crops, each step in two microbatches (the batch's time_ids split with
    its posteriors): stopped after step 1 and resumed, it trains what the run without a stop trains."""
    from nsync_jax.train import trainer

    def config(steps):
        return tiny_config(sdxl_dir, sized_style_dir, data__resize="random_crop", train__grad_accum_steps=2,
                           train__steps=steps, checkpoint__every_steps=1)

    straight = trainer.train(config(2), tmp_path / "straight", progress=False).trained
    trainer.train(config(1), tmp_path / "resumed", progress=False)
    resumed = trainer.train(config(2), tmp_path / "resumed", progress=False).trained
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
