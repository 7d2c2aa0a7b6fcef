"""`nsync-jax caption` with chat models: the released NSYNC question as a preset, answers without the question,
InternVL through transformers' image-text-to-text interface and one-line refusals of custom-code checkpoints.
(Captioners that continue a prompt, BLIP: tests/test_negatives.py.)"""
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from nsync_jax.captions import PROMPT_PRESETS, caption_folder, load_captioner
from nsync_jax.cli import main
from nsync_jax.errors import UserError

WORDS = "a the cat dog red blue star circle picture of painting on with and".split()


def word_tokenizer(special: list[str], **special_tokens):
    """A fast tokenizer over WORDS, the chat roles and `special`, split on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", *special, "USER:", "ASSISTANT:", "user", "assistant", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>", **special_tokens)


def build_tiny_llava(folder):
    """A random LLaVA chat model (CLIP vision tower, Llama text model) with its processor and chat template."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(["<s>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>",
                               extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, image_size=28, patch_size=14, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=template).save_pretrained(folder)
    return folder


def build_tiny_internvl(folder):
    """A random InternVL in transformers' own format (what the `-hf` conversions hold): model, tokenizer with the
    image tokens, tiling image processor and chat template. Its processor is written as files: building one needs
    torchvision (for its video processor), which this project does not install."""
    import torch
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>"}
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>", *image_tokens.values()], eos_token="<|im_end|>",
                               extra_special_tokens=image_tokens)
    tokenizer.save_pretrained(folder)
    tiles = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, max_patches=2)
    tiles.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                              "image_seq_length": 1}))
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<IMG_CONTEXT> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    config = InternVLConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=28, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                         max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=1)
    InternVLForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem, width in (("one", 40), ("two", 90)):
        Image.fromarray(rng.integers(0, 255, (40, width, 3), np.uint8)).save(folder / f"{stem}.png")
    return folder


def test_the_nsync_preset_is_the_released_question():
    assert PROMPT_PRESETS["nsync"] == ("Describe the visual features of image briefly, with no more than 25 words. "
                                       "Write it in prompt format so that I set it as a prompt.")


def test_a_chat_model_answers_the_preset_question(images, tmp_path, capsys):
    llava = build_tiny_llava(tmp_path / "llava")
    args = ["caption", "--images", str(images), "--output", str(tmp_path / "captions"), "--model", str(llava),
            "--max-words", "6"]
    assert main(args + ["--prompt-preset", "nsync"]) == 0
    assert "wrote 2 captions, kept 0" in capsys.readouterr().out
    for stem in ("one", "two"):
        words = (tmp_path / "captions" / f"{stem}.txt").read_text().split()
        # The caption is the answer alone: the decoded question would start "USER:" and hold the preset's words.
        assert 1 <= len(words) <= 6 and words[0] != "USER:" and set(words) <= {*WORDS, "USER:", "ASSISTANT:"}

    assert main(args + ["--prompt-preset", "nsync", "--prompt", "a painting of"]) == 2
    assert capsys.readouterr().err.strip() == "nsync-jax: error: give --prompt or --prompt-preset, not both"


def test_internvl_loads_through_the_image_text_to_text_interface(images, tmp_path):
    from transformers import AutoModelForImageTextToText

    internvl = build_tiny_internvl(tmp_path / "internvl")
    assert type(AutoModelForImageTextToText.from_pretrained(internvl)).__name__ == "InternVLForConditionalGeneration"
    if importlib.util.find_spec("torchvision") is None:  # what a user without torchvision reads
        with pytest.raises(UserError, match=f"^{internvl}: cannot load an image-to-text model \\(ValueError: .*"
                                            "requires `torchvision`[^\n]*$"):
            load_captioner(internvl)
    else:
        assert caption_folder(images, tmp_path / "captions", internvl, prompt=PROMPT_PRESETS["nsync"],
                              progress=False) == {"written": 2, "kept": 0}


def test_custom_code_checkpoints_are_refused_in_one_line(images, tmp_path, capsys):
    internvl2 = tmp_path / "InternVL2-2B"
    internvl2.mkdir()
    (internvl2 / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    assert main(["caption", "--images", str(images), "--output", str(tmp_path / "captions"), "--model",
                 str(internvl2)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(
        f"nsync-jax: error: {internvl2}: model_type 'internvl_chat' (InternVLChatModel, custom code (auto_map) that "
        "is not run) is not one transformers' AutoModelForImageTextToText loads; InternVL2/2.5/3 load from "
        "their -hf conversions (model_type 'internvl', e.g. OpenGVLab/InternVL3-1B-hf); supported model types: ")
    assert {"blip", "internvl", "llava"} <= set(err.strip().split("supported model types: ")[1].split(", "))
    assert not (tmp_path / "captions").exists()
