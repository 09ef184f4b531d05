"""The fast path's program (what gets captured as a CUDA graph) equals the plain path fed the same noise.

Graph capture itself needs a GPU (benchmarks/bench.py checks replay against the plain path there); here the
captured program runs eagerly on the CPU, with fused projections and channels-last VQ, as it is built.
"""

import pytest
import torch

from amused import sampling
from amused.fast import FastDecoder
from amused.pipeline import AmusedPipeline
from conftest import seeded


def test_fused_projections_keep_logits_state_dict_and_memory(ours):
    """`UViT.fuse_projections` (fused Q/K/V, and `condition`'s ~100 projections as one matmul per shared input)
    gives the same logits, keeps the state dict, and adds no weight memory: the parameters become views of the
    fused matrices. After `.to()` the fused matrices follow (they are buffers)."""
    model = ours.transformer
    ids = torch.randint(0, 24, (2, 4, 4), generator=seeded(0))
    hidden, pooled, micro = torch.randn(2, 16, 8), torch.randn(2, 8), torch.tensor([[8.0, 8, 0, 0, 6]] * 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    with torch.no_grad():
        plain = model(ids, hidden, pooled, micro)
        model.fuse_projections()
        fused = model(ids, hidden, pooled, micro)
    assert model.fused_modulation is not None and model.fused_text_kv is not None
    assert any(getattr(m, "fused_qkv", None) is not None for m in model.modules())
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    shared = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(shared.values()) <= storage  # views of the fused matrices, not copies
    first = model.transformer_layers[0].norm1.linear.weight
    assert first.untyped_storage().data_ptr() == model.fused_modulation.untyped_storage().data_ptr()
    model.to(torch.float64)
    assert model.fused_modulation.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(ids, hidden.double(), pooled.double(), micro.double()).float(), plain,
                                   rtol=1e-4, atol=1e-4)
        model.unfuse_projections()
        assert model.fused_modulation is None
        torch.testing.assert_close(model(ids, hidden.double(), pooled.double(), micro.double()).float(), plain,
                                   rtol=1e-4, atol=1e-4)


def test_graph_program_equals_plain_path_with_same_noise(ref_dir):
    plain = AmusedPipeline.from_pretrained(ref_dir)
    fast_pipe = AmusedPipeline.from_pretrained(ref_dir)
    fast = FastDecoder(fast_pipe, compile=False, vq_dtype=torch.float32)
    with torch.inference_mode():
        embeds = plain.encode_prompt(["a cat", "a dog"], None, 1, True)
        micro = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(4, -1)
        start = torch.full((2, 8, 8), 23)
        expected = sampling.decode(plain.logits_fn(embeds, micro, 10.0), start, num_steps=6, mask_token_id=23,
                                   draw="gumbel", generator=seeded(5))
        expected_images = plain.vqvae.decode(expected)
        fast.generator = seeded(5)
        bufs = {"tokens": start.clone(), "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro}
        tokens, images, _ = fast._program(bufs, 10.0, 0, 6, "cosine", (2, 0))
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(images, expected_images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights, prompts, rows", [
    ({"prompt": 0.5, "subject": 0.5, "style": 1.0}, ["a cat, ink style", "a dog"], 4),
    ({"prompt": 0.06, "subject": 0.04}, ["a cat, ink style", "a dog, oil style"], 2),  # sum 1 / g: no uncond rows
])
def test_graph_program_takes_composed_guidance_weights_as_an_input(ref_dir, weights, prompts, rows):
    """Composed guidance (amused.guidance): the (K, B) weights are a graph buffer, so one capture serves every
    weight; the program equals the plain path on them, with or without the unconditional rows."""
    from amused.guidance import ComposedGuidance

    plain = AmusedPipeline.from_pretrained(ref_dir)
    fast = FastDecoder(AmusedPipeline.from_pretrained(ref_dir), compile=False, vq_dtype=torch.float32)
    spec = ComposedGuidance.from_config({"weights": weights})
    with torch.inference_mode():
        embeds = plain.encode_prompt(prompts, None, 1, True, composed=spec, guidance_scale=10.0)
        assert embeds.parts == rows and embeds.weights.shape == (rows - 1, 2)
        micro = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(2 * rows, -1)
        start = torch.full((2, 8, 8), 23)
        weights = embeds.weights * 10.0
        expected = sampling.decode(plain.logits_fn(embeds, micro, weights), start, num_steps=6, mask_token_id=23,
                                   draw="gumbel", generator=seeded(5))
        fast.generator = seeded(5)
        bufs = {"tokens": start.clone(), "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro,
                "weights": weights}
        tokens, _, _ = fast._program(bufs, None, 0, 6, "cosine", (2, 0))
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("task", ["img2img", "inpaint", "unguided"])
def test_graph_program_equals_plain_path_for_image_tasks(ref_dir, task):
    """The same for a run that enters the schedule part-way over a partly known grid (img2img: `total` is the
    whole grid), one whose schedule spreads over the masked region only (inpainting), and one without guidance."""
    plain = AmusedPipeline.from_pretrained(ref_dir)
    fast = FastDecoder(AmusedPipeline.from_pretrained(ref_dir), compile=False, vq_dtype=torch.float32)
    guidance = 1.0 if task == "unguided" else 4.0
    with torch.inference_mode():
        embeds = plain.encode_prompt(["a cat"], None, 1, guidance > 1)
        micro = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(embeds.hidden.shape[0], -1)
        start = torch.randint(0, 16, (1, 8, 8), generator=seeded(1))  # codebook ids of the tiny model
        start[:, 2:6, 1:7] = 23
        start_step, total = (3, torch.tensor([64])) if task == "img2img" else (0, None)
        expected = sampling.decode(plain.logits_fn(embeds, micro, guidance), start, num_steps=8, mask_token_id=23,
                                   start_step=start_step, total=total, temperature=(1, 0), draw="gumbel",
                                   generator=seeded(7))
        fast.generator = seeded(7)
        bufs = {"tokens": start.clone(), "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro}
        if total is not None:
            bufs["total"] = total
        tokens, _, _ = fast._program(bufs, guidance, start_step, 8, "cosine", (1, 0))
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens[start != 23], start[start != 23])  # known tokens are kept


def test_enable_fast_needs_cuda(ours):
    import pytest

    with pytest.raises(ValueError, match="CUDA"):
        ours.enable_fast()


def test_bench_runs_side_by_side_on_cpu(ref_dir, tmp_path, capsys):
    """`amused bench` on the CPU: both pipelines timed per batch size, the speed-up is their ratio, the FLOP
    count grows with the batch, no graph-vs-plain claim is made without a GPU, and the JSON is what it returned."""
    import json

    from amused.bench import run

    rows = run(batches=(1, 2), steps=2, repeats=2, device="cpu", dtype="fp32", model=str(ref_dir),
               out=str(tmp_path / "b.json"))
    timings = [r for r in rows if "ours" in r]
    assert [r["batch"] for r in timings] == [1, 2]
    for r in timings:
        assert r["ours"]["ms_min"] <= r["ours"]["ms_median"] and r["ours"]["peak_gib"] is None  # no GPU memory
        assert r["speedup"] == pytest.approx(r["reference"]["ms_median"] / r["ours"]["ms_median"])
        assert r["side_px"] == 8 and "host_syncs" not in r  # the tiny model's 8x8 images; syncs are a GPU check
    one, two = (r["flops"] for r in timings)
    assert one["uvit_forward"] > 0 and two == {k: 2 * v for k, v in one.items()}  # every part is linear in batch
    assert rows[-1] == {"model": str(ref_dir), "checks": {"plain_vs_graph_tokens_equal": None}}  # not run on CPU
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["threads"] == torch.get_num_threads()
    assert f"{str(ref_dir):<12}     2" in capsys.readouterr().out  # the table has the batch-2 row


def test_cudnn_autotune_is_scoped():
    """Benchmark mode is on inside the capture and the user's setting comes back after, even on error."""
    from amused.fast import cudnn_autotune

    before = torch.backends.cudnn.benchmark
    try:
        for user in (False, True):
            torch.backends.cudnn.benchmark = user
            with cudnn_autotune():
                assert torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark is user
            with pytest.raises(RuntimeError), cudnn_autotune():
                raise RuntimeError("capture failed")
            assert torch.backends.cudnn.benchmark is user
    finally:
        torch.backends.cudnn.benchmark = before


def test_vq_group_norm_option_switches_both_ways(ref_dir):
    """The fast path's chunked group norms are undone by a later FastDecoder asking for the native ones (the
    benchmark builds a plain-check decoder first: its switch must not leak into the one it times)."""
    from amused.group_norm import ChunkedGroupNorm

    pipe = AmusedPipeline.from_pretrained(ref_dir)
    chunked = lambda: any(isinstance(m, ChunkedGroupNorm) for m in pipe.vqvae.decoder.modules())  # noqa: E731
    FastDecoder(pipe, compile=False, vq_dtype=torch.float32)
    assert chunked()
    FastDecoder(pipe, compile=False, vq_dtype=torch.float32, vq_group_norm="native")
    assert not chunked()
    with pytest.raises(ValueError, match="vq_group_norm"):
        FastDecoder(pipe, compile=False, vq_group_norm="fast")


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compile_option_traces_and_keeps_the_tokens(ref_dir, monkeypatch, mode):
    """Each `compile` mode sends the decode through `torch.compile` and gives the plain loop's tokens and images.
    Inductor's kernels are a GPU matter (tests/test_gpu.py); here `torch.compile` gets dynamo's counting
    backend, which runs the traced graphs as they are, so this checks what is traced, and that tracing changes
    nothing. An unknown mode is refused with the allowed ones named."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: real_compile(fn, backend=counter, dynamic=False))
    torch._dynamo.reset()
    plain = AmusedPipeline.from_pretrained(ref_dir)
    with pytest.raises(ValueError, match="'blocks', 'full'"):
        FastDecoder(AmusedPipeline.from_pretrained(ref_dir), compile="turbo", vq_dtype=torch.float32)
    fast = FastDecoder(AmusedPipeline.from_pretrained(ref_dir), compile=mode, vq_dtype=torch.float32)
    assert counter.frame_count == 0  # compiling is lazy: nothing is traced before the first call
    try:
        with torch.inference_mode():
            embeds = plain.encode_prompt(["a cat"], None, 1, True)
            micro = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(2, -1)
            start = torch.full((1, 8, 8), 23)
            expected = sampling.decode(plain.logits_fn(embeds, micro, 4.0), start, num_steps=3, mask_token_id=23,
                                       draw="gumbel", generator=seeded(2))
            fast.generator = seeded(2)
            bufs = {"tokens": start.clone(), "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro}
            tokens, images, _ = fast._program(bufs, 4.0, 0, 3, "cosine", (2, 0))
            expected_images = plain.vqvae.decode(expected)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count > 0 and counter.op_count > 0
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(images, expected_images, rtol=1e-5, atol=1e-5)


def test_compiled_step_is_one_graph(ref_dir):
    """`torch.compile` traces a whole step (U-ViT, guidance, sampling) without a graph break: the draws come in
    as tensors, and the last step is a tensor flag, not a second graph."""
    import torch._dynamo

    from amused.fast import guided_step

    pipe = AmusedPipeline.from_pretrained(ref_dir)
    mask_id, V = pipe.scheduler.mask_token_id, pipe.transformer.config.codebook_size
    with torch.inference_mode():
        embeds = pipe.encode_prompt(["a cat"], None, 1, True)
        ctx = pipe.transformer.condition(embeds.hidden, embeds.pooled, torch.tensor([[16.0, 16, 0, 0, 6]] * 2))
        grid = torch.full((1, 64), mask_id)
        draws = sampling.gumbel_draws((1, 64, V), seeded(0), "cpu")
        explained = torch._dynamo.explain(guided_step)(
            pipe.transformer, grid, ctx, draws, torch.tensor([64]), torch.tensor(0.5), torch.tensor(1.0),
            torch.tensor(False), 10.0, mask_id, (1, 8, 8))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
