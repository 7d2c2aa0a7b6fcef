"""Textual Inversion / NSYNC training on a tiny model: fused gradients, exact resume, data checks, export."""
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conftest import CONFIG, tiny_config, write_style_dataset
from nsync_jax import checkpoints, optim, tokens
from nsync_jax.cli import main
from nsync_jax.config import load_config
from nsync_jax.data.style_dataset import load_style_dataset
from nsync_jax.errors import UserError
from nsync_jax.pipeline import encode_text, load_pipeline
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import data as train_data, methods, step as train_step, trainer
from nsync_jax.train.config import check_config

def diffusers_text_states(model, files, prompts, token=None):
    """diffusers' pipeline after `load_textual_inversion(files, token=token)`, its token ids of `prompts` and
    its text encoder's hidden states for them."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    reference.load_textual_inversion(files, token=token)
    text = reference.maybe_convert_prompt(prompts, reference.tokenizer)
    torch_ids = reference.tokenizer(text, padding="max_length", max_length=16, truncation=True,
                                    return_tensors="pt").input_ids
    with torch.no_grad():
        return reference, torch_ids.numpy(), reference.text_encoder(torch_ids).last_hidden_state.numpy()


def nsync_step_inputs(sd1_dir, style_dir):
    """The tiny model's step spec and frozen weights, an NSYNC batch of 2 triples, and random token rows."""
    from flax import nnx

    config = tiny_config(sd1_dir, style_dir)
    pipe = load_pipeline(sd1_dir)
    tokens.add_placeholder_tokens(pipe.tokenizer, config.placeholder_token, config.num_vectors)
    dataset = load_style_dataset(style_dir / "images", captions=style_dir / "captions",
                                 negatives=style_dir / "negatives", resolution=32)
    data = train_data.prepare(pipe, dataset, config, config.placeholder_token)
    batch = {k: jnp.asarray(v) for k, v in methods.get("nsync").batch(data, config, step=0).items()}
    graphdefs, frozen = {}, {}
    for name in ("text_encoder", "unet"):
        graphdefs[name], frozen[name] = nnx.split(pipe.modules()[name])
    spec = train_step.StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                            pipe.vae.config.scaling_factor, jnp.float32, 0)
    rows = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32)), jnp.float32)
    return spec, frozen, batch, rows


def test_fused_gradients_equal_separate_gradients(sd1_dir, style_dir):
    spec, frozen, batch, rows = nsync_step_inputs(sd1_dir, style_dir)
    keys = train_step.group_keys(jax.random.key(0), 3, share_noise=False)

    def fused_loss(group_rows, spec):
        return train_step.denoising_losses(spec, group_rows, frozen, batch["ids"], batch["mean"], batch["logvar"],
                                        keys).sum()

    def one_group_loss(group_rows, group):  # `group` is traced: the three gradients share one compilation
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, group, 1)
        return train_step.denoising_losses(spec, group_rows, frozen, take(batch["ids"]), take(batch["mean"]),
                                        take(batch["logvar"]), take(keys)).sum()

    fused = jax.jit(jax.grad(lambda r: fused_loss(r, spec)))(jnp.broadcast_to(rows, (3, 2, 32)))
    separate = jax.jit(jax.grad(one_group_loss))
    for group in range(3):
        alone = separate(rows[None], group)[0]
        np.testing.assert_allclose(fused[group], alone, rtol=2e-4, atol=1e-7)
        assert np.abs(alone).max() > 0
    # The three groups see different images and noise, so their gradients differ.
    assert not np.allclose(fused[0], fused[1], rtol=0.1)
    # Rematerialising the UNet changes memory, not gradients.
    remat_spec = dataclasses.replace(spec, remat=True)
    remat = jax.jit(jax.grad(lambda r: fused_loss(r, remat_spec)))(jnp.broadcast_to(rows, (3, 2, 32)))
    np.testing.assert_allclose(remat, fused, rtol=1e-5, atol=1e-8)


def test_nonfinite_steps_are_skipped_when_asked(sd1_dir, style_dir):
    from flax import nnx

    config = tiny_config(sd1_dir, style_dir, method="textual_inversion")
    pipe = load_pipeline(sd1_dir)
    graphdefs, frozen = {}, {}
    for name in ("text_encoder", "unet"):
        graphdefs[name], frozen[name] = nnx.split(pipe.modules()[name])
    spec = train_step.StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                            pipe.vae.config.scaling_factor, jnp.float32, 0)
    method = methods.get("textual_inversion")
    tx = trainer.make_optimizer(config, method)
    step = jax.jit(train_step.make_train_step(method.gradients(spec, config), tx, norm_metric="row_norm",
                                              skip_nonfinite=True))
    rows = jnp.ones((2, 32), jnp.float32)
    opt_state = tx.init(rows)
    ids = np.asarray(tokens.tokenize(pipe.tokenizer, ["a red star"]))[None]
    good = {"ids": ids, "mean": np.zeros((1, 1, 8, 8, 4), np.float32), "logvar": np.zeros((1, 1, 8, 8, 4), np.float32)}
    bad = dict(good, mean=np.full_like(good["mean"], np.nan))
    skipped_rows, skipped_state, metrics = step(rows, opt_state, frozen, bad, jax.random.key(0))
    assert not np.isfinite(metrics["loss"])
    np.testing.assert_array_equal(skipped_rows, rows)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(skipped_state), jax.tree.leaves(opt_state)))
    new_rows, _, metrics = step(rows, opt_state, frozen, good, jax.random.key(0))
    assert np.isfinite(metrics["loss"]) and not np.allclose(new_rows, rows)


# Each variant compiles its own step (about 10 s on 2 CPU cores): the default run checks the paper's rule and one
# without the anchor (the released one is rerun against torch below); `-m slow` the rest.
DEFAULT_RUN_VARIANTS = ("orthogonal_anchor", "orthogonal")


@pytest.mark.parametrize("variants", [DEFAULT_RUN_VARIANTS, pytest.param(
    tuple(v for v in optim.VARIANTS if v not in DEFAULT_RUN_VARIANTS), marks=pytest.mark.slow)])
def test_variants_without_the_anchor_term_do_not_run_the_anchor(sd1_dir, style_dir, variants):
    from nsync_jax.optim import orthogonal_projection, refine_gradients

    spec, frozen, batch, rows = nsync_step_inputs(sd1_dir, style_dir)
    other_anchor = {k: jnp.concatenate([v[:2], v[1:2]]) for k, v in batch.items()}  # the negatives as anchors
    key = jax.random.key(3)
    pos, extra, _ = jax.jit(lambda b: train_step.group_gradients(spec, 3, False, rows, frozen, b, key))(batch)
    for variant in variants:
        # The update is -1e4 x the refined gradient: large enough to stand out of the rows' float32 rounding.
        tx = optax.chain(orthogonal_projection(variant), optax.sgd(1e4))
        config = tiny_config(sd1_dir, style_dir, nsync__variant=variant)
        step = jax.jit(train_step.make_train_step(methods.get("nsync").gradients(spec, config), tx,
                                                  norm_metric="row_norm"))
        new_rows, _, metrics = step(rows, tx.init(rows), frozen, batch, key)
        # The positive and negative gradients are those of the three-group pass, refined as the variant says.
        refined = refine_gradients(pos, extra["negative_grads"], extra["anchor_grads"], variant=variant)
        np.testing.assert_allclose((rows - new_rows) / 1e4, refined, rtol=1e-4, atol=1e-9)
        moved, _, _ = step(rows, tx.init(rows), frozen, other_anchor, key)
        reads_anchor = variant in ("orthogonal_anchor", "orthogonal_anchor_refined", "mean", "released_v5.1")
        assert ("loss_anchor" in metrics) == reads_anchor
        assert np.array_equal(moved, new_rows) != reads_anchor


def test_released_variants_equal_a_torch_rerun_of_the_released_loop(sd1_dir, style_dir):
    """The released `contrastive_training.py` step, re-run in torch on the tiny model: the positive, negative and
    anchor passes backpropagate into the whole embedding table without zeroing its gradient between them, the
    token rows' gradient is snapshotted after each, and each `version` combines the snapshots as released. Each
    `released*` variant, applied to this project's fused three-group gradients on the same latents, noise and
    timesteps, gives the same update."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from nsync_jax.optim import refine_gradients

    spec, frozen, batch, rows = nsync_step_inputs(sd1_dir, style_dir)
    key = jax.random.key(11)
    pos, extra, _ = jax.jit(lambda b: train_step.group_gradients(spec, 3, False, rows, frozen, b, key))(batch)

    reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    table = reference.text_encoder.get_input_embeddings()
    vocab = table.weight.shape[0]
    reference.text_encoder.resize_token_embeddings(vocab + len(rows))
    table = reference.text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[vocab:] = torch.from_numpy(np.array(rows))
    noise_scheduler = DDPMScheduler.from_config(reference.scheduler.config)
    to_torch = lambda x: torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    snapshots = []
    for group, group_key in enumerate(train_step.group_keys(key, 3, share_noise=False)):
        latents, noise, t = train_step.draw_latents(spec, group_key, batch["mean"][group], batch["logvar"][group])
        latents, noise, t = to_torch(latents), to_torch(noise), torch.from_numpy(np.asarray(t))
        context = reference.text_encoder(torch.from_numpy(np.asarray(batch["ids"][group])))[0]
        prediction = reference.unet(noise_scheduler.add_noise(latents, noise, t), t, context).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()  # no zero_grad: the gradient accumulates
        snapshots.append(table.weight.grad[vocab:].clone().double())

    def projection(a, b):
        return (torch.sum(a * b) / torch.sum(b * b)) * b

    g1, g2, g3 = snapshots
    released = {"released_v4.1": g1 - projection(g1, g2), "released": g1 + projection(g1, g1) - projection(g1, g2),
                "released_v5.0": (g1 + g2) / 2, "released_v5.1": (g1 + g2 + g3) / 3}
    for variant, theirs in released.items():
        ours = refine_gradients(pos, extra["negative_grads"], extra["anchor_grads"], variant=variant)
        theirs = theirs.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(), err_msg=variant)


def test_table_weight_decay_shrinks_the_vocabulary_as_torch_adamw_over_the_whole_table():
    """train.weight_decay_scope="table": AdamW over the token rows and a stopped-gradient `table_scale` leaves the
    token rows and the scaled table where torch's AdamW over the whole table (gradient on the token rows only,
    as the released scripts zero the others) leaves them, step after step."""
    from nsync_jax.train import trainables

    config = load_config(CONFIG)
    config.train.weight_decay_scope, config.train.learning_rate, config.train.scale_lr = "table", 0.05, False
    rng = np.random.default_rng(0)
    table, rows = rng.standard_normal((10, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
    grads = rng.standard_normal((4, 2, 8)).astype(np.float32)

    whole = torch.nn.Parameter(torch.from_numpy(np.concatenate([table, rows])))
    adamw = torch.optim.AdamW([whole], lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    tx = trainer.make_optimizer(config, methods.get("textual_inversion"))
    trained = {"rows": jnp.asarray(rows), "table_scale": jnp.ones((), jnp.float32)}
    opt_state = tx.init(trained)
    for grad in grads:
        whole.grad = torch.from_numpy(np.concatenate([np.zeros_like(table), grad]))
        adamw.step()
        updates, opt_state = tx.update({"rows": jnp.asarray(grad), "table_scale": jnp.zeros(())}, opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        expected = whole.detach().numpy()
        np.testing.assert_allclose(trained["rows"], expected[10:], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(table * float(trained["table_scale"]), expected[:10], rtol=1e-6)
    assert float(trained["table_scale"]) == pytest.approx((1 - 0.05 * 1e-2) ** 4, rel=1e-6)

    # The step embeds vocabulary ids from the scaled table and new ids from the rows; no gradient reaches the scale.
    decayed = trainables.EMBEDDINGS.configured(config)
    ids = jnp.array([[1, 10, 11, 3]])
    embed = lambda t: decayed.embed(t, jnp.asarray(table), ids)
    np.testing.assert_allclose(embed(trained)[0], np.stack([table[1] * float(trained["table_scale"]),
                                                            *np.asarray(trained["rows"]),
                                                            table[3] * float(trained["table_scale"])]), rtol=1e-6)
    assert float(jax.grad(lambda t: embed(t).sum())(trained)["table_scale"]) == 0.0


def test_a_run_with_table_weight_decay_records_the_scale_and_says_so_on_export(sd1_dir, style_dir, tmp_path,
                                                                              capsys):
    config = tiny_config(sd1_dir, style_dir, train__steps=3, train__weight_decay_scope="table")
    result = trainer.train(config, tmp_path / "work", progress=False)
    lr = config.train.learning_rate * config.train.batch_size  # train.scale_lr
    assert float(result.trained["table_scale"]) == pytest.approx((1 - lr * 1e-2) ** 3, rel=1e-6)
    assert main(["export", "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "style.safetensors")]) == 0
    assert "the rest of the vocabulary was decayed" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "style.json").read_text())
    assert sidecar["weight_decay_scope"] == "table" and sidecar["table_scale"] < 1


def test_negatives_can_be_prompted_not_in_the_style_of_the_token(sd1_dir, style_dir):
    """nsync.negative_prompt="not_in_style" (the released v5.x): the negatives' prompts say "not in the style of"
    the token; the positives' and the anchors' do not change."""
    config = tiny_config(sd1_dir, style_dir, nsync__negative_prompt="not_in_style")
    pipe = load_pipeline(sd1_dir)
    method = methods.get("nsync")
    method.add_words(pipe.tokenizer, config)
    data = method.prepare(pipe, method.read_data(config), config, workdir=None, progress=False)
    ids = data.batch(0)["ids"]
    captions = [(style_dir / "captions" / f"item{i}.txt").read_text().strip() for i in range(4)]
    table = lambda words: tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(
        f"{caption} {words} {config.placeholder_token}", pipe.tokenizer) for caption in captions])
    in_style, not_in_style = table("in the style of"), table("not in the style of")
    items = lambda prompts, group: [next(i for i in range(4) if np.array_equal(prompts[i], row)) for row in group]
    # Each negative is prompted with its positive's caption, negated; the anchors keep the plain prompt.
    assert items(not_in_style, ids[1]) == items(in_style, ids[0])
    assert len(items(in_style, ids[2])) == 2


def test_a_latent_sampled_once_is_the_same_at_every_step():
    """data.latent_sample="once": one posterior draw per image, mean + std * N(0, 1) from the seed, which every
    step's `sample_posterior` then returns whatever its key."""
    from nsync_jax.data.latent_cache import sampled_once
    from nsync_jax.models.vae import sample_posterior

    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((2, 3, 2, 4, 4, 4)).astype(np.float32)
    once = sampled_once(np.concatenate([mean, logvar], axis=-1), seed=5)
    expected = mean + np.exp(0.5 * logvar) * np.random.default_rng(5).standard_normal(mean.shape)
    draws = [np.asarray(sample_posterior(*np.split(once, 2, axis=-1), jax.random.key(k))) for k in (0, 1)]
    np.testing.assert_allclose(draws[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(draws[0], draws[1])
    per_step = [np.asarray(sample_posterior(mean, logvar, jax.random.key(k))) for k in (0, 1)]
    assert not np.allclose(per_step[0], per_step[1])


def test_training_can_start_from_an_embedding_file(tmp_path):
    from nsync_jax.export import write_embeddings

    config = load_config(CONFIG)
    table = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    learned = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    write_embeddings(tmp_path / "start.safetensors", "<old>", learned)
    config.initializer_embedding = str(tmp_path / "start.safetensors")
    np.testing.assert_array_equal(methods.get("nsync").initial_rows(config, table, tokenizer=None), learned)
    config.num_vectors = 3
    with pytest.raises(UserError, match="start.safetensors: embedding of shape \\(2, 32\\), the run needs"):
        methods.get("nsync").initial_rows(config, table, tokenizer=None)


# The same resume code serves both methods; the Textual Inversion case runs with `-m slow` (about 2 minutes).
@pytest.mark.parametrize("method", ["nsync", pytest.param("textual_inversion", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(sd1_dir, style_dir, tmp_path, monkeypatch, method):
    config = tiny_config(sd1_dir, style_dir, method=method)
    straight = trainer.train(config, tmp_path / "straight", progress=False).trained
    # The second run is stopped by SIGTERM during its third step (as a cluster's preemption would), then rerun.
    draw_of_step = train_data.draw_examples

    def terminated_at_third_step(*args, **kwargs):
        if args[3] == 2:  # the step index
            os.kill(os.getpid(), signal.SIGTERM)
        return draw_of_step(*args, **kwargs)

    monkeypatch.setattr(train_data, "draw_examples", terminated_at_third_step)
    with pytest.raises(UserError, match=r"stopped by SIGTERM after step 3; .* run the same command again"):
        trainer.train(config, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed = trainer.train(config, tmp_path / "resumed", progress=False).trained
    np.testing.assert_array_equal(straight, resumed)
    from safetensors.numpy import load_file

    exported = [load_file(tmp_path / d / "learned_embeds.safetensors")["<tiny-style>"] for d in ("straight", "resumed")]
    np.testing.assert_array_equal(exported[0], exported[1])
    initial = np.asarray(load_pipeline(sd1_dir).text_encoder.embeddings.token_embedding.embedding[...])
    assert not np.allclose(straight, 0) and np.abs(straight - initial[
        load_pipeline(sd1_dir).tokenizer.convert_tokens_to_ids("painting</w>")]).max() > 1e-3
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "grad_norm", "steps_per_sec"} <= set(m) for m in metrics)


def test_bad_dataset_lists_every_problem_and_writes_nothing(sd1_dir, tmp_path):
    data = write_style_dataset(tmp_path / "data")
    (data / "negatives" / "item1.png").unlink()
    (data / "captions" / "item2.txt").unlink()
    (data / "images" / "item3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = tiny_config(sd1_dir, data)
    with pytest.raises(UserError) as error:
        trainer.train(config, tmp_path / "work", progress=False)
    message = str(error.value)
    for expected in ("missing negative", "negatives/item1.png", "missing caption", "captions/item2.txt",
                     "unreadable image", "images/item3.png"):
        assert expected in message
    assert not (tmp_path / "work").exists()
    config.data.skip_bad_items = True
    config.train.steps = 1
    with pytest.warns(UserWarning, match="skipping 3 bad item"):
        trainer.train(config, tmp_path / "work", progress=False)


def test_export_loads_in_diffusers(sd1_dir, style_dir, tmp_path, capsys):
    work = tmp_path / "work"
    code = main(["train", "--config", str(CONFIG), "--workdir", str(work), f"--config.model={sd1_dir}",
                 f"--config.data.images={style_dir / 'images'}", f"--config.data.captions={style_dir / 'captions'}",
                 f"--config.data.negatives={style_dir / 'negatives'}", "--config.train.steps=3"])
    assert code == 0, capsys.readouterr().err
    for fmt, name in (("diffusers", "style.safetensors"), ("a1111", "style.pt")):
        assert main(["export", "--workdir", str(work), "--step", "3", "--output", str(tmp_path / name),
                     "--format", fmt]) == 0
    sidecar = json.loads((tmp_path / "style.json").read_text())
    assert sidecar["step"] == 3 and sidecar["method"] == "nsync" and sidecar["variant"] == "orthogonal_anchor"

    prompt = ["a cat in the style of <tiny-style>"]
    pipe = load_pipeline(sd1_dir)
    pipe.add_embeddings(tmp_path / "style.safetensors")
    ids = tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(p, pipe.tokenizer) for p in prompt])
    ours = np.asarray(encode_text(pipe.text_encoder, jnp.asarray(pipe.extra_token_rows), jnp.asarray(ids)))
    for name, token in (("style.safetensors", None), ("style.pt", "<tiny-style>")):
        _, torch_ids, expected = diffusers_text_states(sd1_dir, str(tmp_path / name), prompt, token=token)
        np.testing.assert_array_equal(torch_ids, ids)
        assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5

    assert main(["export", "--workdir", str(work), "--step", "7", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoint for step 7 (have 3)" in capsys.readouterr().err


def test_config_overrides_and_errors(tmp_path):
    config = load_config(CONFIG, ["--config.train.steps=9", "--config.train.learning_rate=1", "--config.model=/m"])
    assert config.train.steps == 9 and config.train.learning_rate == 1.0 and config.model == "/m"
    with pytest.raises(UserError, match="--config.train.stepz: no such config key"):
        load_config(CONFIG, ["--config.train.stepz=3"])
    with pytest.raises(UserError, match="--config.train.steps=many: not a valid int"):
        load_config(CONFIG, ["--config.train.steps=many"])
    config.method = "dreambooth"
    with pytest.raises(UserError, match="config method='dreambooth' must be one of"):
        check_config(config)


def test_max_timestep_bounds_the_training_timesteps():
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                  "beta_start": 0.00085, "beta_end": 0.012})
    mean = np.zeros((512, 2, 2, 4), np.float32)
    draw = lambda max_timestep: np.asarray(train_step.draw_latents(
        train_step.StepSpec(None, schedule, 1.0, jnp.float32, 0, max_timestep=max_timestep),
        jax.random.key(0), mean, mean)[2])
    assert draw(300).max() < 300 and draw(300).min() == 0 and len(set(draw(300))) > 200
    assert draw(0).max() > 900  # 0: the whole schedule
    config = load_config(CONFIG, ["--config.train.max_timestep=-1", "--config.method=textual_inversion"])
    with pytest.raises(UserError, match="train.max_timestep=-1"):
        check_config(config)


def test_bfloat16_compute_keeps_float32_rows_and_state(sd1_dir, style_dir, tmp_path):
    """train.dtype=bfloat16 runs the frozen model in bf16; the rows and AdamW moments stay float32, and the
    run follows the float32 one closely (a bf16 master copy would lose updates of 1e-3 relative size)."""
    config = tiny_config(sd1_dir, style_dir, train__steps=3)
    full = trainer.train(config, tmp_path / "float32", progress=False).trained
    config.train.dtype = "bfloat16"
    half = trainer.train(config, tmp_path / "bfloat16", progress=False).trained
    manager = checkpoints.manager(tmp_path / "bfloat16" / "checkpoints", keep=3)
    state = manager.item_metadata(3)["state"]
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.dtype != np.int32} == {np.dtype(np.float32)}
    pipe = load_pipeline(sd1_dir)
    initial = methods.get("nsync").initial_rows(config, np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...]),
                                    pipe.tokenizer)
    # Adam moves every coordinate by about the learning rate whatever its gradient's size, so one whose gradient
    # is near zero can go either way in bf16 (seen on a CPU with native bf16 arithmetic, AMD EPYC with
    # avx512_bf16): compare the whole update, not its worst coordinate.
    moved = np.linalg.norm(full - initial)
    assert moved > 1e-3 and np.linalg.norm(half - full) < 0.2 * moved


def test_gradient_accumulation_averages_the_microbatches():
    """`accumulate` gives the means of what the gradient function returns on each slice, where slice i holds
    every k-th example from i (so each device keeps its own) and draws with fold_in(key, i)."""
    def gradients(params, frozen, batch, key):
        noise = jax.random.normal(key, ())
        grads = {"w": params["w"] * jnp.sum(batch["x"], axis=(0, 1)) + noise}
        return grads, {"negative_grads": -grads["w"]}, {"loss": jnp.mean(batch["x"]) + frozen}

    params = {"w": jnp.arange(3.0)}
    batch = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 3)), jnp.float32)}
    key = jax.random.key(1)
    got = jax.jit(train_step.accumulate(gradients, 3))(params, 0.5, batch, key)
    parts = [gradients(params, 0.5, {"x": batch["x"][:, i::3]}, jax.random.fold_in(key, i)) for i in range(3)]
    want = jax.tree.map(lambda *xs: sum(xs) / 3, *parts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert train_step.accumulate(gradients, 1) is gradients
