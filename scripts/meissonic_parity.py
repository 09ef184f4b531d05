"""Parity of our Meissonic with the reference (viiika/Meissonic): transformer logits, and whole seeded generations.

Part 1, logits (src/transformer.py). For a small random config with 2x resampling (Meissonic's layout) and one
without (Monetico's):
1. build the reference `Transformer2DModel`, fill every weight with seeded noise and `save_pretrained` it: the
   published layout (transformer/config.json + diffusion_pytorch_model.safetensors);
2. load ours from those files with `amused.loading.load_model` (strict: every key, every shape);
3. save ours with `amused.loading.save_model` and load the reference back from our files;
4. compare logits on the same inputs: token grids with masks, text states, pooled text, the pipeline's
   micro-conditioning, its image/text ids (the reference pipeline's own `_prepare_latent_image_ids`, with its
   1024-px rule) and several timesteps of its schedule; in float32 and in bfloat16.

Part 2, whole generations (src/pipeline.py, pipeline_img2img.py, pipeline_inpaint.py, scheduler.py). Tiny random
pipelines (`amused.bench_meissonic.random_pipeline`: "meissonic-tiny" at 1024 px, the only size at which the
reference builds Meissonic's rotary ids right, with a 32-px-a-token VQ so that the grid stays 32x32; and
"monetico-tiny" at 32 px), the reference's pipelines over the same weights (`reference_pipeline`), the same
prompts, negative prompt, steps, guidance and seeded CPU generators: text-to-image, img2img and inpainting tokens
must be equal, images within float rounding of the VQ decoder. The reference pipelines run from the checkout,
imported as they are (their `src` package).

    python scripts/meissonic_parity.py --reference /path/to/Meissonic [--out docs/results/meissonic_parity.json]

Compatibility: the reference constructs diffusers' `Attention(processor=FluxAttnProcessor2_0())`. In current
diffusers (0.42.1, this project's test pin) that name is a deprecated alias returning `FluxAttnProcessor`, written
for `FluxAttention`, which reads `attn.head_dim`; the generic `Attention` has no such attribute, so the reference
fails with AttributeError at its first forward. Where that alias is in use, this script sets
`head_dim = inner_dim // heads` on each such module (the value FluxAttention holds) and counts them in the JSON;
nothing else of the reference changes. With diffusers 0.31.0 (the reference's era; run it with
`PYTHONPATH=<a target dir holding diffusers==0.31.0>`) nothing is patched.
"""

from __future__ import annotations

import argparse
import dataclasses
import ast
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from amused.bench_meissonic import import_reference as import_checkout  # noqa: E402
from amused.bench_meissonic import patch_head_dim, random_pipeline, reference_pipeline  # noqa: E402
from amused.loading import load_model, save_model  # noqa: E402
from amused.models.meissonic import CLASS_NAME, MeissonicConfig, MeissonicTransformer, meissonic_config  # noqa: E402

CONFIGS = {
    # 2 dual + 2 single blocks, 2 heads of 8, rotary axes (2, 2, 4): every kind of weight, a CPU second.
    "meissonic_layout": dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                             joint_attention_dim=12, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                             vocab_size=24, codebook_size=16, downsample=True, upsample=True),
    "monetico_layout": dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                            joint_attention_dim=12, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                            vocab_size=24, codebook_size=16, downsample=False, upsample=False),
}
TEXT_LEN = 9
GRID = 8  # tokens per side at the input
STEPS = 48  # the pipeline default; timesteps 47 ... 0
TIMESTEPS = (47, 30, 1, 0)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise in every parameter (norm weights too, so that swapped keys would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * noise)  # RMSNorm weights
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))  # fan-in scaled


def import_reference(path: Path):
    """The reference's transformer class, and its pipeline's image-id helper. The helper is taken alone from
    src/pipeline.py (compiled from that file's own source), so that the pipeline module's imports (transformers'
    CLIP, diffusers' pipeline machinery), which the transformer does not need, need not resolve."""
    sys.path.insert(0, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from src.transformer import Transformer2DModel
    source = (path / "src" / "pipeline.py").read_text()
    helper = next(node for node in ast.parse(source).body
                  if isinstance(node, ast.FunctionDef) and node.name == "_prepare_latent_image_ids")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[helper], type_ignores=[]), str(path / "src" / "pipeline.py"), "exec"), namespace)
    return Transformer2DModel, namespace["_prepare_latent_image_ids"]


def inputs(cfg: MeissonicConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = 3
    ids = torch.randint(0, cfg.codebook_size, (B, GRID, GRID), generator=g)
    ids[0] = cfg.mask_token_id  # all masked (first step)
    ids[1, :, : GRID // 2] = cfg.mask_token_id  # half masked
    ids[2] = torch.where(torch.rand(GRID, GRID, generator=g) < 0.3, cfg.mask_token_id, ids[2])
    return dict(ids=ids, text=torch.randn(B, TEXT_LEN, cfg.joint_attention_dim, generator=g),
                pooled=torch.randn(B, cfg.pooled_projection_dim, generator=g),
                micro=torch.tensor([[1024.0, 1024, 0, 0, 6], [512, 512, 0, 0, 6], [1024, 768, 16, 32, 5]]))


def reference_logits(ref, prepare_ids, cfg: MeissonicConfig, x: dict, timestep: int, dtype: torch.dtype):
    B, h, w = x["ids"].shape
    # The reference pipeline's rule: ids over (h/2, w/2) at height 1024 (Meissonic, downsampling), else over
    # (h, w) (its helper halves the sizes it is given, so it is given 2h, 2w).
    img_ids = prepare_ids(B, h, w, "cpu", torch.long) if cfg.downsample else prepare_ids(B, 2 * h, 2 * w, "cpu", torch.long)
    txt_ids = torch.zeros(TEXT_LEN, 3, dtype=dtype)
    return ref(hidden_states=x["ids"], micro_conds=x["micro"].to(dtype), pooled_projections=x["pooled"].to(dtype),
               encoder_hidden_states=x["text"].to(dtype), img_ids=img_ids, txt_ids=txt_ids,
               timestep=torch.tensor([timestep], dtype=torch.long), return_dict=False)[0]


def our_logits(model: MeissonicTransformer, x: dict, timestep: int, dtype: torch.dtype):
    ctx = model.condition(x["text"].to(dtype), x["pooled"].to(dtype), x["micro"].to(dtype), grid=(GRID, GRID))
    return model.forward_tokens(x["ids"], ctx, torch.tensor(float(timestep)))


def compare(name: str, kwargs: dict, Reference, prepare_ids, tmp: Path, seed: int) -> dict:
    built = Reference(**kwargs).eval()
    randomize(built, seed)
    built.save_pretrained(tmp / name / "reference" / "transformer", safe_serialization=True)
    ours = load_model(MeissonicTransformer, MeissonicConfig, tmp / name / "reference" / "transformer")
    save_model(ours, tmp / name / "ours" / "transformer", CLASS_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Both sides read the same files: weights loaded from safetensors sit at other memory alignments than
        # freshly built ones, and the CPU float32 GEMM then rounds differently (about 1e-6 at these sizes).
        ref = Reference.from_pretrained(tmp / name / "reference" / "transformer").eval()
        ref_back = Reference.from_pretrained(tmp / name / "ours" / "transformer").eval()
    patched = patch_head_dim(ref) + patch_head_dim(ref_back)
    x = inputs(ours.config, seed + 1)
    result = {"config": json.loads((tmp / name / "reference" / "transformer" / "config.json").read_text()),
              "grid": [GRID, GRID], "text_len": TEXT_LEN, "batch": x["ids"].shape[0], "timesteps": list(TIMESTEPS),
              "attention_modules_given_head_dim": patched}
    for dtype in (torch.float32, torch.bfloat16):
        ref.to(dtype), ref_back.to(dtype), ours.to(dtype)
        diffs, back, scale, agree = [], [], 0.0, []
        with torch.no_grad():
            for t in TIMESTEPS:
                expected = reference_logits(ref, prepare_ids, ours.config, x, t, dtype).float()
                got = our_logits(ours, x, t, dtype).float()
                from_ours = reference_logits(ref_back, prepare_ids, ours.config, x, t, dtype).float()
                assert got.shape == expected.shape == (3, ours.config.codebook_size, GRID, GRID), got.shape
                diffs.append((got - expected).abs().max().item())
                back.append((from_ours - expected).abs().max().item())
                scale = max(scale, expected.abs().max().item())
                agree.append((got.argmax(1) == expected.argmax(1)).float().mean().item())
        result[str(dtype).removeprefix("torch.")] = {
            "max_abs_diff": max(diffs), "max_abs_diff_per_timestep": diffs, "max_abs_logit": scale,
            "argmax_agreement": min(agree),
            "reference_from_our_save_max_abs_diff": max(back)}
    return result


# ----------------------------------------------------------------------------------------------------------
# Part 2: whole generations

GENERATION = dict(prompt=["a red apple on a table", "a lighthouse at dusk"], negative_prompt=["blurry", "dark"],
                  num_inference_steps=8, guidance_scale=9.0)
PIPELINE_PRESETS = {"meissonic_layout": ("meissonic-tiny", 1024), "monetico_layout": ("monetico-tiny", 32)}


def _inputs(side: int, seed: int):
    """A seeded RGB image and a mask over its left half (PIL, as users pass them)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))
    mask = PIL.Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side // 2, side))
    return image, mask


def generation_parity(ref_module, seed: int) -> dict:
    """Tokens and images of seeded whole generations, ours against the reference's, per layout and task."""
    import numpy as np

    from amused.tasks import pipeline_class

    results = {}
    for name, (preset, side) in PIPELINE_PRESETS.items():
        pipe = random_pipeline(preset, "cpu", torch.float32, seed=seed)
        randomize(pipe.transformer, seed + 1)  # peaked logits (fan-in scaled noise): the choices depend on them
        (image, mask), (other, _) = _inputs(side, seed), _inputs(side, seed + 1)
        images = [image, other]  # one per prompt: the reference neither broadcasts images nor masks over prompts
        extra = {"text": {"height": side, "width": side}, "img2img": {"image": images, "strength": 0.6},
                 "inpaint": {"image": images, "mask_image": [mask, mask]}}
        layout = {"side_px": side, "token_grid": side // pipe.vae_scale_factor,
                  "transformer": dataclasses.asdict(pipe.transformer.config)}
        for task, kwargs in extra.items():
            ours = pipeline_class(pipe.family, task).from_pipe(pipe)
            ref = reference_pipeline(pipe, ref_module, task)
            out = {}
            for output_type in ("latent", "np"):
                args = {**GENERATION, **kwargs, "output_type": output_type}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = ours(**args, generator=torch.Generator().manual_seed(seed)).images
                    b = ref(**args, generator=torch.Generator().manual_seed(seed)).images
                if output_type == "latent":
                    out["tokens_equal"] = bool(torch.equal(a.cpu(), b.cpu()))
                    out["tokens_fraction_equal"] = float((a.cpu() == b.cpu()).float().mean())
                    out["tokens_shape"] = list(a.shape)
                else:
                    out["images_max_abs_diff"] = float(np.abs(np.asarray(a) - np.asarray(b)).max())
            layout[task] = out
        results[name] = layout
    return results


def preset_parameters(name: str) -> int:
    with torch.device("meta"):  # sizes only, no memory
        return sum(p.numel() for p in MeissonicTransformer(meissonic_config(name)).parameters())


def git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of viiika/Meissonic")
    parser.add_argument("--commit", help="the reference's commit, when --reference is not a git checkout")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "meissonic_parity.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.reference / "src" / "transformer.py").is_file():
        parser.error(f"{args.reference} holds no src/transformer.py; give a checkout of viiika/Meissonic")
    commit = git_commit(args.reference) or args.commit
    if commit is None:
        parser.error(f"{args.reference} is not a git checkout; pass --commit")
    torch.manual_seed(args.seed)
    Reference, prepare_ids = import_reference(args.reference.resolve())
    import diffusers

    with tempfile.TemporaryDirectory() as tmp:
        results = {name: compare(name, kwargs, Reference, prepare_ids, Path(tmp), args.seed + 10 * i)
                   for i, (name, kwargs) in enumerate(CONFIGS.items())}
    generations = generation_parity(import_checkout(args.reference), args.seed)
    report = {"reference": "https://github.com/viiika/Meissonic", "reference_commit": commit,
              "reference_file": "src/transformer.py", "diffusers": diffusers.__version__, "torch": torch.__version__,
              "python": platform.python_version(), "device": "cpu", "results": results,
              "generations": {"reference_files": ["src/pipeline.py", "src/pipeline_img2img.py",
                                                  "src/pipeline_inpaint.py", "src/scheduler.py"],
                              "settings": {**GENERATION, "seed": args.seed, "generator": "CPU", "dtype": "float32",
                                           "img2img_strength": 0.6, "inpaint_mask": "left half",
                                           "images": "seeded uniform noise, one per prompt"},
                              "results": generations,
                              "note": "tokens are the parity claim. Images go through each side's VQ decoder (ours, "
                                      "diffusers' VQModel) on equal tokens: float32 rounding, amplified by the random "
                                      "6-stage decoder's group norms at 1024 px (1e-3 of the range); about 1e-6 with "
                                      "Monetico-tiny's 1-stage decoder at 32 px."},
              "note": "bfloat16 bit-exactness depends on the reference's diffusers: 0.42.1 hands the output "
                      "projections a contiguous attention output (addmm, bias fused), as we do; 0.31.0 hands them "
                      "the strided text/image slices (matmul, then a separate bias add: one more bf16 rounding, "
                      "about 1 ulp). float32 is exact with both.",
              "published_preset_parameters": {n: preset_parameters(n) for n in ("meissonic", "monetico")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: float32 max|diff| {r['float32']['max_abs_diff']:.3g}, bfloat16 max|diff| "
              f"{r['bfloat16']['max_abs_diff']:.3g} (|logit| up to {r['bfloat16']['max_abs_logit']:.3g}), "
              f"argmax agreement fp32 {r['float32']['argmax_agreement']:.4f} bf16 {r['bfloat16']['argmax_agreement']:.4f}")
    for name, r in generations.items():
        print(f"{name} whole generations: " + ", ".join(
            f"{task} tokens equal {r[task]['tokens_equal']} (images max|diff| {r[task]['images_max_abs_diff']:.2g})"
            for task in ("text", "img2img", "inpaint")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
