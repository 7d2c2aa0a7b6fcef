"""Full text-to-image sampling against diffusers' StableDiffusionPipeline from the same initial latents."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline)

from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate, initial_latents

PROMPTS = ["a red star in the style of painting", "a photo of a cat"]
TORCH_SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
                    "dpm": DPMSolverMultistepScheduler}


def diffusers_images(folder, latents_nchw, *, scheduler=None, steps, guidance, negative="", clip_skip=0):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    if scheduler is not None:
        pipe.scheduler = TORCH_SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embeds = {}
    if clip_skip:
        # diffusers 0.42's own clip_skip path reads `text_encoder.text_model`, which transformers 5 removed;
        # this is what it computes: the hidden state `clip_skip` layers from the end, then the final norm.
        def encode(prompts):
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
                return pipe.text_encoder.final_layer_norm(hidden)
        embeds = dict(prompt_embeds=encode(PROMPTS), negative_prompt_embeds=encode([negative] * len(PROMPTS)))
    else:
        embeds = dict(prompt=PROMPTS, negative_prompt=[negative] * len(PROMPTS))
    return pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                latents=torch.from_numpy(latents_nchw), output_type="np").images


@pytest.mark.parametrize("family, scheduler, steps, guidance, clip_skip", [
    ("sd1", None, 6, 7.5, 0),         # PNDM (PLMS), epsilon, conv projections
    ("sd2", None, 5, 4.0, 1),         # DDIM, v-prediction, linear projections, penultimate layer
    ("sd1", "euler", 4, 7.5, 0),
    ("sd2", "dpm", 4, 1.0, 0),        # guidance off: one UNet pass per step
])
def test_sampling_matches_diffusers(family, scheduler, steps, guidance, clip_skip, request):
    folder = request.getfixturevalue(f"{family}_dir")
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    reference = diffusers_images(folder, latents, scheduler=scheduler, steps=steps, guidance=guidance,
                                 negative="blue", clip_skip=clip_skip)
    pipe = load_pipeline(folder)
    settings = SampleSettings(scheduler=scheduler, steps=steps, guidance=guidance, height=32, width=32,
                              clip_skip=clip_skip, batch_size=2)
    ours = generate(pipe, PROMPTS, negative_prompt="blue", settings=settings, progress=False,
                    latents=latents.transpose(0, 2, 3, 1))
    assert ours.shape == reference.shape == (2, 32, 32, 3)
    assert np.abs(ours - reference).max() <= 2 / 255
    # The images must depend on the prompt, or the comparison above proves little.
    assert np.abs(ours[0] - ours[1]).max() > 10 / 255


def test_noise_depends_only_on_seed_and_image_index():
    together = initial_latents(7, [0, 1, 2, 3], (4, 4, 4))
    apart = np.concatenate([initial_latents(7, [2, 3], (4, 4, 4)), initial_latents(7, [0, 1], (4, 4, 4))])
    np.testing.assert_array_equal(together, apart[[2, 3, 0, 1]])
    assert not np.allclose(together[0], together[1])
    assert not np.allclose(together, initial_latents(8, [0, 1, 2, 3], (4, 4, 4)))


def test_an_image_is_the_same_bits_in_any_call(sd1_dir):
    """Every call has `batch_size` images per device (the last one padded), so an image's bits do not depend on
    which images share its call or where it sits in it; another per-device batch changes float rounding only."""
    pipe = load_pipeline(sd1_dir)
    prompts = PROMPTS * 2

    def run(indices, batch):
        return generate(pipe, [prompts[i] for i in indices], latents=initial_latents(3, indices, (16, 16, 4)),
                        settings=SampleSettings(steps=3, height=32, width=32, batch_size=batch), progress=False)

    together = run([0, 1, 2, 3], 3)  # calls of 3 and 1 (+ 2 padding rows)
    np.testing.assert_array_equal(run([3, 1], 3), together[[3, 1]])
    np.testing.assert_allclose(run([0, 1, 2, 3], 4), together, atol=1e-5)


def test_every_batch_reaches_on_batch_in_order(sd1_dir):
    """Batches are fetched one dispatch behind: each must still reach `on_batch` once, in order, as returned."""
    seen = []
    images = generate(load_pipeline(sd1_dir), PROMPTS * 3, seed=3, progress=False,
                      settings=SampleSettings(steps=2, height=32, width=32, batch_size=2),
                      on_batch=lambda first, batch: seen.append((first, batch)))
    assert [first for first, _ in seen] == list(range(0, len(images), 2))
    np.testing.assert_array_equal(np.concatenate([batch for _, batch in seen]), images)


def test_handoff_draws_high_timesteps_with_the_base_and_low_ones_with_the_tuned_model(sd1_dir):
    from nsync_jax.errors import UserError
    from nsync_jax.schedulers import make_sampler

    base, tuned = load_pipeline(sd1_dir), load_pipeline(sd1_dir)
    tuned.unet.conv_out.bias[...] += 0.5  # both of the tuned model's parts differ from the base's
    tuned.text_encoder.final_layer_norm.bias[...] += 0.5

    def run(pipe, handoff=0, base_model=None):
        settings = SampleSettings(scheduler="ddim", steps=3, height=32, width=32, handoff_timestep=handoff)
        return generate(pipe, PROMPTS, seed=3, settings=settings, base=base_model, progress=False)

    timesteps = make_sampler("ddim", base.scheduler_config, 3).timesteps
    only_base, only_tuned = run(base), run(tuned)
    assert np.abs(only_base - only_tuned).max() > 1e-2
    np.testing.assert_allclose(run(tuned, int(min(timesteps)), base), only_base, atol=1e-5)
    np.testing.assert_allclose(run(tuned, int(max(timesteps)) + 1, base), only_tuned, atol=1e-5)
    mixed = run(tuned, int(max(timesteps)), base)  # the first step by the base, the other two tuned
    assert np.abs(mixed - only_base).max() > 1e-3 and np.abs(mixed - only_tuned).max() > 1e-3
    with pytest.raises(UserError, match="handoff"):
        run(tuned, 0, base)
    with pytest.raises(UserError, match="handoff"):
        run(tuned, 500)
