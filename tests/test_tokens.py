"""Tokenizer loading, placeholder tokens, learned-embedding files, and agreement with diffusers' loader."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from conftest import write_tiny_tokenizer
from nsync_jax import tokens
from nsync_jax.errors import UserError
from nsync_jax.pipeline import encode_text, load_pipeline


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    """A fresh tokenizer per test: adding tokens mutates it."""
    return tokens.load_tokenizer(tiny_tokenizer_dir)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'}: tokenizer folder not found"):
        tokens.load_tokenizer(tmp_path / "nope")
    # transformers would build an empty tokenizer from this folder without a word.
    with pytest.raises(UserError, match=f"{tmp_path}: not a CLIP tokenizer folder"):
        tokens.load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match=f"{tmp_path}: cannot load the tokenizer"):
        tokens.load_tokenizer(tmp_path)


def test_tokenize_pads_and_truncates(tokenizer):
    ids = tokens.tokenize(tokenizer, ["a cat", "a photo of a red dog in the style of a blue star circle painting"])
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    bos, eos, cat = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("cat</w>")
    assert list(ids[0, :4]) == [bos, tokenizer.convert_tokens_to_ids("a</w>"), cat, eos]
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert ids[1, 0] == bos and ids[1, -1] == eos and eos not in ids[1, :-1]


def test_placeholder_tokens_and_expansion(tokenizer):
    base = len(tokenizer)
    ids = tokens.add_placeholder_tokens(tokenizer, "<monet>", 3)
    assert ids == [base, base + 1, base + 2]
    tokens.add_placeholder_tokens(tokenizer, "<cat>", 1)
    prompt = tokens.expand_placeholders("a red star in the style of <monet>, <cat>", tokenizer)
    assert prompt == "a red star in the style of <monet> <monet>_1 <monet>_2, <cat>"
    encoded = tokens.tokenize(tokenizer, [prompt])[0]
    assert list(encoded[8:11]) == ids and base + 3 in encoded
    # The tokenizer lower-cases prompts, so the expansion must too; a vector written out stays as written.
    assert tokens.expand_placeholders("<MONET> and <monet>_2", tokenizer) == "<monet> <monet>_1 <monet>_2 and <monet>_2"
    assert list(tokens.tokenize(tokenizer, [tokens.expand_placeholders("<Monet>", tokenizer)])[0, 1:4]) == ids


def test_expansion_matches_diffusers(tokenizer):
    from diffusers.loaders import TextualInversionLoaderMixin

    tokens.add_placeholder_tokens(tokenizer, "<monet>", 3)
    tokens.add_placeholder_tokens(tokenizer, "<cat>", 1)
    for prompt in ["a <monet> painting of a <cat>", "<cat>", "no token here", "<monet>,<monet>"]:
        expected = TextualInversionLoaderMixin()._maybe_convert_prompt(prompt, tokenizer)
        assert tokens.expand_placeholders(prompt, tokenizer) == expected


def test_expansion_is_one_pass(tokenizer):
    # diffusers' str.replace would expand `sks` again inside `sksx sksx_1`.
    tokens.add_placeholder_tokens(tokenizer, "sks", 2)
    tokens.add_placeholder_tokens(tokenizer, "sksx", 2)
    assert tokens.expand_placeholders("sks and sksx", tokenizer) == "sks sks_1 and sksx sksx_1"


def test_duplicate_placeholder_is_refused(tokenizer):
    tokens.add_placeholder_tokens(tokenizer, "<monet>", 2)
    size = len(tokenizer)
    for name, count in [("<monet>", 1), ("<MONET>", 1), ("<x>", 0), ("cat</w>", 1)]:
        with pytest.raises(UserError, match="already in the tokenizer|at least 1"):
            tokens.add_placeholder_tokens(tokenizer, name, count)
    with pytest.raises(UserError, match="'<monet>_1' is already in the tokenizer"):
        tokens.add_placeholder_tokens(tokenizer, "<monet>_1", 1)
    assert len(tokenizer) == size


def test_tokenizer_with_id_gaps_is_refused(tmp_path):
    folder = write_tiny_tokenizer(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    del vocab["!"]  # id 0: the ids now run 1..548 for 548 entries
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match=r"got ids \[549, 550\], but the tokenizer had 548 entries"):
        tokens.add_placeholder_tokens(tokens.load_tokenizer(folder), "<x>", 2)


def test_embed_tokens_sends_gradient_only_to_used_new_rows():
    table = jnp.arange(12.0).reshape(4, 3)
    rows = jnp.arange(9.0).reshape(3, 3) + 100
    ids = jnp.array([[0, 4, 2], [6, 6, 1]])  # new rows 0 and 2 used, 1 not; table row 3 unused
    out = tokens.embed_tokens(table, rows, ids)
    np.testing.assert_array_equal(out, [[table[0], rows[0], table[2]], [rows[2], rows[2], table[1]]])
    weights = jnp.arange(18.0).reshape(2, 3, 3)
    loss = lambda table, rows: (tokens.embed_tokens(table, rows, ids) * weights).sum()
    table_grad, rows_grad = jax.grad(loss, argnums=(0, 1))(table, rows)
    np.testing.assert_array_equal(rows_grad, [weights[0, 1], np.zeros(3), weights[1, 0] + weights[1, 1]])
    # The learned ids are clamped to the last table row for the frozen lookup; none of that may leak there.
    np.testing.assert_array_equal(table_grad[3], np.zeros(3))
    np.testing.assert_array_equal(tokens.embed_tokens(table, rows[:0], ids[:, [0, 2]]), table[ids[:, [0, 2]]])


def test_initial_rows_copy_the_initializer(tokenizer):
    table = np.random.default_rng(0).standard_normal((len(tokenizer), 4)).astype(np.float32)
    rows = tokens.initial_rows(table, tokenizer, "painting", 2)
    np.testing.assert_array_equal(rows, table[[tokenizer.convert_tokens_to_ids("painting</w>")] * 2])
    with pytest.raises(UserError, match="initializer token 'zzz' is 3 tokens"):
        tokens.initial_rows(table, tokenizer, "zzz", 1)


def write_all_formats(folder, rows):
    """The same learned rows in every file layout users have."""
    save_file({"<style>": rows}, folder / "diffusers.safetensors")
    torch.save({"<style>": torch.from_numpy(rows)}, folder / "diffusers.bin")
    # What A1111's `Embedding.save` writes.
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(rows)}, "name": "style",
                "step": 500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5"}, folder / "a1111.pt")
    save_file({"emb_params": rows}, folder / "a1111.safetensors")
    save_file({"<one>": rows[0]}, folder / "single.safetensors")
    torch.save({"<half>": torch.from_numpy(rows).to(torch.bfloat16)}, folder / "half.bin")


def test_every_embedding_format_loads(tmp_path):
    rows = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    write_all_formats(tmp_path, rows)
    for name, token in [("diffusers.safetensors", "<style>"), ("diffusers.bin", "<style>"),
                        ("a1111.pt", "a1111"), ("a1111.safetensors", "a1111")]:
        loaded = tokens.load_learned_embeddings(tmp_path / name)
        assert list(loaded) == [token]
        np.testing.assert_array_equal(loaded[token], rows)
    np.testing.assert_array_equal(tokens.load_learned_embeddings(tmp_path / "single.safetensors")["<one>"],
                                  rows[:1])
    half = tokens.load_learned_embeddings(tmp_path / "half.bin")["<half>"]
    assert half.dtype == np.float32 and np.abs(half - rows).max() < 2e-2


def test_bad_embedding_files(tmp_path):
    save_file({"not_an_embedding": np.arange(3, dtype=np.int64)}, tmp_path / "ints.safetensors")
    save_file({"clip_l": np.ones((1, 768), np.float32), "clip_g": np.ones((1, 1280), np.float32)},
              tmp_path / "sdxl.safetensors")
    torch.save({"string_to_param": {"*": torch.ones(1, 4), "x": torch.ones(1, 4)}}, tmp_path / "two.pt")
    (tmp_path / "style.ckpt").write_bytes(b"")
    for name, message in [("ints.safetensors", "entry 'not_an_embedding' is not an embedding"),
                          ("sdxl.safetensors", "an SDXL embedding"),
                          ("two.pt", "'string_to_param' must hold exactly one embedding"),
                          ("style.ckpt", "unknown embedding file type"),
                          ("missing.pt", "embedding file not found")]:
        with pytest.raises(UserError, match=f"{tmp_path / name}: {message}"):
            tokens.load_learned_embeddings(tmp_path / name)


def test_pt_embeddings_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    write_all_formats(tmp_path, np.ones((1, 32), np.float32))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=f"{tmp_path / 'a1111.pt'}: reading .pt weights needs PyTorch"):
        tokens.load_learned_embeddings(tmp_path / "a1111.pt")


def test_apply_learned_embeddings(tokenizer):
    base = len(tokenizer)
    table = np.random.default_rng(0).standard_normal((base, 4)).astype(np.float32)
    learned = {"<a>": np.full((2, 4), 1.0, np.float32), "<b>": np.full((1, 4), 2.0, np.float32)}
    extended = tokens.apply_learned_embeddings(tokenizer, table, learned, source="learned.safetensors")
    assert extended.dtype == np.float32 and extended.shape == (base + 3, 4)
    np.testing.assert_array_equal(extended[:base], table)
    ids = tokens.tokenize(tokenizer, [tokens.expand_placeholders("<b> <a>", tokenizer)])[0]
    np.testing.assert_array_equal(extended[ids[1:4]], [learned["<b>"][0], *learned["<a>"]])

    # All or nothing: a bad second entry leaves the tokenizer as it was.
    size = len(tokenizer)
    bad = {"<c>": np.ones((1, 4), np.float32), "<d>": np.ones((1, 5), np.float32)}
    with pytest.raises(UserError, match="learned.safetensors: embedding '<d>' has width 5, but the text encoder's"):
        tokens.apply_learned_embeddings(tokenizer, extended, bad, source="learned.safetensors")
    with pytest.raises(UserError, match="'<a>' is already in the tokenizer"):
        tokens.apply_learned_embeddings(tokenizer, extended, {"<c>": bad["<c>"], "<a>": bad["<c>"]}, source="x")
    with pytest.raises(UserError, match="the tokenizer has 552 tokens but the embedding table 549 rows"):
        tokens.apply_learned_embeddings(tokenizer, table, {"<c>": bad["<c>"]}, source="x")
    assert len(tokenizer) == size


def test_a1111_embedding_matches_diffusers_load_textual_inversion(tiny_tokenizer_dir, tmp_path):
    """An A1111 `.pt` through our tokens and text encoder, and through diffusers' loader and transformers."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel

    from nsync_jax.models.clip_text import load_text_encoder

    torch_tokenizer = tokens.load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(torch_tokenizer), max_position_embeddings=16, eos_token_id=torch_tokenizer.eos_token_id,
        bos_token_id=torch_tokenizer.bos_token_id, pad_token_id=torch_tokenizer.pad_token_id)).eval()
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    rows = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    write_all_formats(tmp_path, rows)
    prompts = ["a red star in the style of a1111", "a photo of a cat"]

    class Loader(TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    loader = Loader()
    loader.load_textual_inversion(str(tmp_path / "a1111.pt"), token="a1111", tokenizer=torch_tokenizer,
                                  text_encoder=text_encoder)
    expected_ids = tokens.tokenize(torch_tokenizer, loader.maybe_convert_prompt(prompts, torch_tokenizer))
    with torch.no_grad():
        expected = text_encoder(torch.from_numpy(expected_ids).long()).last_hidden_state.numpy()

    tokenizer = tokens.load_tokenizer(tiny_tokenizer_dir)
    model = load_text_encoder(tmp_path / "text_encoder")
    frozen = model.embeddings.token_embedding.embedding[...]
    table = tokens.apply_learned_embeddings(tokenizer, np.asarray(frozen),
                                            tokens.load_learned_embeddings(tmp_path / "a1111.pt"), source="a1111.pt")
    ids = tokens.tokenize(tokenizer, [tokens.expand_placeholders(p, tokenizer) for p in prompts])
    np.testing.assert_array_equal(ids, expected_ids)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda state, rows, ids: nnx.merge(graphdef, state)(
        inputs_embeds=tokens.embed_tokens(frozen, rows, ids)))(state, table[len(frozen):], ids)
    assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() <= 1e-5


def test_learned_tokens_match_diffusers_load_textual_inversion(sd1_dir, tmp_path):
    """The pipeline's own path (`add_embeddings`, `encode_text`) against a diffusers pipeline."""
    from diffusers import StableDiffusionPipeline

    rows = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    save_file({"<style>": rows}, tmp_path / "learned_embeds.safetensors")
    prompts = ["a red star in the style of <style>", "a photo of a cat"]

    reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    reference.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    expanded = reference.maybe_convert_prompt(prompts, reference.tokenizer)
    ids = reference.tokenizer(expanded, padding="max_length", max_length=reference.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.text_encoder(ids).last_hidden_state.numpy()

    pipe = load_pipeline(sd1_dir)
    assert pipe.add_embeddings(tmp_path / "learned_embeds.safetensors") == ["<style>"]
    our_ids = tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(p, pipe.tokenizer) for p in prompts])
    np.testing.assert_array_equal(our_ids, ids.numpy())
    ours = encode_text(pipe.text_encoder, jnp.asarray(pipe.extra_token_rows), jnp.asarray(our_ids))
    assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() <= 1e-5
    with pytest.raises(UserError, match="token '<style>' is already in the tokenizer"):
        pipe.add_embeddings(tmp_path / "learned_embeds.safetensors")


def test_clip_vocabulary_built_from_the_bpe_file_has_clip_ids(tmp_path):
    from nsync_jax.toyworld.pretrain import CLIP_BPE

    folder = tokens.write_clip_tokenizer(tmp_path / "tok", tokens.clip_bpe_merges(CLIP_BPE), model_max_length=77)
    tokenizer = tokens.load_tokenizer(folder)
    assert len(tokenizer) == 49408
    # OpenAI CLIP's ids (as in every SD 1.x tokenizer): "a photo of a cat".
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_unreadable_bpe_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_text("not gzip")
    with pytest.raises(UserError, match="bpe.txt.gz"):
        tokens.clip_bpe_merges(bad)
