"""The runtime every face shares: which fast-path mode a run gets, which random stream, how batched server calls
are padded."""

import pytest
import torch

from amused.runtime import Engine, make_generator, resolve_fast


def test_fast_mode_by_device_and_expected_images():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_fast("auto", cpu, 10**6) == "off"  # the CPU has no fast path
    assert [resolve_fast("auto", cuda, n) for n in (1, 8, 9, 31, 32)] == ["off", "off", "graph", "graph", "compile"]
    assert resolve_fast("graph", cuda, 1) == "graph"
    with pytest.raises(ValueError, match="--fast compile needs a CUDA device"):
        resolve_fast("compile", cpu)
    with pytest.raises(ValueError, match="--fast 'turbo'"):
        resolve_fast("turbo", cuda)


def test_generators_draw_on_the_device_unless_the_reference_stream_is_asked():
    assert make_generator("cpu", 3).device.type == "cpu"
    assert torch.equal(make_generator("cpu", 3).get_state(), torch.Generator().manual_seed(3).get_state())
    assert make_generator("cuda:0", 3, reference_stream=True).device.type == "cpu"  # no CUDA needed for it
    with pytest.raises(ValueError, match="--seed must be a whole number"):
        from amused.runtime import check_seed

        check_seed(-1, "--seed")


def test_which_draws_a_call_makes():
    """diffusers' stream by default with a CPU generator or on the CPU (a seeded CPU generator gives diffusers'
    images); the fast draws when the engine (every face) says so: inverse-CDF on the CPU, Gumbel on a GPU."""
    from amused.pipeline import _draw_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    cpu_gen = torch.Generator()
    assert [_draw_for(cpu_gen, cpu, s) for s in (None, True, False)] == ["reference", "reference", "cdf"]
    assert [_draw_for(None, cpu, s) for s in (None, True, False)] == ["reference", "reference", "cdf"]
    assert [_draw_for(cpu_gen, cuda, s) for s in (None, True, False)] == ["reference", "reference", "cdf"]
    assert [_draw_for(None, cuda, s) for s in (None, True, False)] == ["gumbel", "reference", "gumbel"]


def test_engine_on_the_cpu_draws_fast_unless_the_reference_stream_is_asked(ours):
    """Through the engine (what the CLI, server and demo hold) the CPU gets the fast draws: the same image for the
    same seed, not diffusers' stream; `reference_stream=True` gives exactly what the pipeline gives with a
    seeded CPU generator (diffusers' images), and the task pipelines follow the engine."""
    default = ours("a cat", height=8, width=8, generator=torch.Generator().manual_seed(3), output_type="latent").images
    engine = Engine.wrap(ours, "tiny", reference_stream=False)
    fast = [engine.pipe("a cat", height=8, width=8, generator=engine.generator(3), output_type="latent").images
            for _ in range(2)]
    assert torch.equal(fast[0], fast[1]) and not torch.equal(fast[0], default)
    assert engine.task("img2img").reference_stream is False
    engine = Engine.wrap(ours, "tiny", reference_stream=True)
    ref = engine.pipe("a cat", height=8, width=8, generator=engine.generator(3), output_type="latent").images
    assert torch.equal(ref, default)


def test_batched_calls_pad_to_a_warmed_size_only_on_the_fast_path():
    graphed = Engine(pipe=None, model_name="x", fast="graph", reference_stream=False, warmed=[1, 8])
    assert [graphed.bucket(n) for n in (1, 2, 7, 8, 9)] == [1, 8, 8, 8, 9]
    plain = Engine(pipe=None, model_name="x", fast="off", reference_stream=False, warmed=[1, 8])
    assert plain.bucket(3) == 3  # padding would only add work on the plain loop


def test_thread_count_from_the_environment(monkeypatch):
    import torch

    from amused.runtime import configure_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("AMUSED_NUM_THREADS", " ")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads() == 1  # a blank AMUSED_NUM_THREADS falls through to OMP_NUM_THREADS
        for bad in ("0", "two", "-3"):
            monkeypatch.setenv("AMUSED_NUM_THREADS", bad)
            with pytest.raises(ValueError, match=f"AMUSED_NUM_THREADS='{bad}' must be a whole number >= 1 of threads"):
                configure_cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_on_the_cpu_is_bf16_only_where_the_cpu_does_it(monkeypatch):
    """`--dtype auto` on the CPU: bf16 where the CPU has bf16 arithmetic, float32 elsewhere and always with
    diffusers' random stream (whose images are float32 ones); an engine loads its weights so."""
    from amused import runtime

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(runtime, "native_cpu_bf16", lambda native=native: native)
        assert runtime.pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
        assert runtime.pick_dtype("auto", cpu, reference_stream=True) == torch.float32
        assert runtime.pick_dtype("fp32", cpu) == torch.float32
        assert runtime.pick_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    engine = runtime.load_engine("embedded", device="cpu")
    assert engine.pipe.transformer.dtype == torch.bfloat16
    image = engine.task("text")("red apple", generator=engine.generator(0), num_inference_steps=2).images[0]
    assert image.size == (64, 64) and len(set(image.getdata())) > 10  # a picture, not a flat colour
    assert runtime.load_engine("embedded", device="cpu", reference_stream=True).pipe.transformer.dtype == torch.float32
