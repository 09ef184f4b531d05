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
