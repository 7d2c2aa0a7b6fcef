"""The kohya-ss LoRA layout (`export --format a1111-lora`, what A1111 and ComfyUI read): diffusers'
`load_lora_weights` gives the same models from it as from the diffusers-layout file, and `sample --lora`
(`read_lora_file` + `merge_lora`) reads it to the same weights as diffusers."""
import numpy as np
from safetensors.numpy import load_file

from conftest import jitted
from nsync_jax import lora
from nsync_jax.cli import main
from nsync_jax.pipeline import load_pipeline
from nsync_jax.train import trainer
from test_train import write_style_dataset
from test_trainable import PROMPT, flat_state, lora_config, rel_error, torch_text_and_unet, unet_inputs


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(sd1_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    config = lora_config(sd1_dir, write_style_dataset(tmp_path / "style"), lora__text_encoder=True,
                         method="textual_inversion", train__steps=2, train__learning_rate=0.05)
    trainer.train(config, tmp_path / "work", progress=False)
    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("diffusers-lora", "a1111-lora")}
    for fmt, path in files.items():
        assert main(["export", "--workdir", str(tmp_path / "work"), "--format", fmt, "--output", str(path)]) == 0, \
            capsys.readouterr().err
    kohya = load_file(files["a1111-lora"])
    unet_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{unet_q}.lora_down.weight"].shape == (2, 8) and kohya[f"{unet_q}.lora_up.weight"].shape == (8, 2)
    assert float(kohya[f"{unet_q}.alpha"]) == 4.0  # lora.alpha itself: the up matrix is not rescaled
    assert "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight" in kohya

    inputs = unet_inputs(3)
    reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    _, base_text, base_unet = torch_text_and_unet(reference, PROMPT, inputs)
    outputs = {}
    for fmt, path in files.items():
        reference.load_lora_weights(str(path))
        outputs[fmt] = torch_text_and_unet(reference, PROMPT, inputs)
        reference.unload_lora_weights()
    _, kohya_text, kohya_unet = outputs["a1111-lora"]
    _, diffusers_text, diffusers_unet = outputs["diffusers-lora"]
    # Not trivially equal: diffusers applied the kohya file's adapters to both models.
    assert rel_error(kohya_text, base_text) > 1e-3 and rel_error(kohya_unet, base_unet) > 1e-3
    assert rel_error(kohya_text, diffusers_text) <= 1e-6
    assert rel_error(kohya_unet, diffusers_unet) <= 1e-6

    # `sample --lora` (read_lora_file + merge_lora) gives diffusers' UNet, and the same weights from both files.
    merged = {}
    for fmt, path in files.items():
        merged[fmt] = load_pipeline(sd1_dir)
        lora.merge_lora(merged[fmt].modules(), lora.read_lora_file(path))
    assert rel_error(np.asarray(jitted(merged["a1111-lora"].unet)(*inputs)), kohya_unet) <= 1e-4
    for name in ("unet", "text_encoder"):
        ours, theirs = (flat_state(merged[fmt].modules()[name]) for fmt in files)
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6, err_msg=key)
