"""Dynamic batching: one worker thread owns the pipeline and runs queued requests, several at a time.

The event loop never touches the model. A request becomes a `Job` in a bounded deque; the worker takes the
oldest job and, if it is batchable and other requests are likely to come, waits until `batch_window_ms` after
that job arrived (or until the batch is full) for other jobs with the same `batch_key`, then runs them all as ONE
pipeline call with a list of prompts and hands each job its share of the images.

The wait only pays when batch-mates are on their way. The worker estimates the number of requests in the system
by Little's law (arrival rate x time from arrival to answer, both moving averages): below 1.5, as with one
client sending a request after each answer, the job starts at once instead of idling for the window.

Which jobs batch together: text-to-image jobs without a seed that share size, steps, guidance and
temperature (prompts and negative prompts may differ: the pipeline takes one per prompt). The pipeline draws
all its random numbers for a batch from one generator, so an image depends on its batch-mates; a job with a
`seed` therefore runs alone, as `pipe([prompt] * n, generator=engine.generator(seed))`, and gives the same
images as the Python API or `amused generate --seed` would on the same device (the engine picks the stream:
on-device draws on a GPU). img2img and inpainting jobs also run alone (each brings its own image). A batched
call is padded up to a batch size warmed at start (`Engine.bucket`), so it replays a captured graph.

Before taking jobs the worker warms the engine up (`Engine.warm_up`: captures and compiles the fast path for
the batch sizes it will run); /health says "warming" until then. On the plain loop (the CPU) a running job is
stopped between steps once its deadline passes or its client is gone.

The oldest job always goes into the next batch, so later jobs that batch together cannot starve it. A job
whose deadline passed before it started, or whose client gave up, is dropped without running.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any



class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; `retry_after` is a rough wait in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Cancelled(Exception):
    """A running job was stopped between steps: its deadline passed or its client went away."""


@dataclass
class JobResult:
    images: list[Any]  # PIL images; the request handler encodes them (off the worker, so the GPU keeps busy)
    metadata: list[dict[str, Any]]  # each image's settings, for its PNG's "amused" text chunk
    seed: int | None  # the seed that reproduces these images on their own; None when batched with others
    batch_size: int  # jobs in the pipeline call that made these images
    queue_s: float  # waiting before the call started
    run_s: float  # the pipeline call (and PNG encoding)
    warnings: list[str]


@dataclass(eq=False)
class Job:
    """One request: what to make and where the answer goes (an asyncio future on the server's loop)."""

    task: str  # "text", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str
    num_images: int
    seed: int | None
    options: dict[str, Any]  # resolved num_inference_steps, guidance_scale, temperature, height, width, ...
    deadline: float  # time.monotonic() after which the job is not started
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    image: Any = None  # PIL image (img2img, inpaint)
    mask_image: Any = None  # PIL image (inpaint)
    metadata: dict[str, Any] = field(default_factory=dict)  # written into each PNG
    enqueued: float = 0.0
    abandoned: bool = False

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a pipeline call; None: this job runs alone."""
        if self.task != "text" or self.seed is not None:
            return None
        o = self.options
        return (o["height"], o["width"], o["num_inference_steps"], o["guidance_scale"], o["temperature"],
                o.get("sampler"))

    def deliver(self, result: JobResult | None = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the waiting request (thread-safe; a no-op when it gave up or the loop closed)."""
        if self.future is None or self.loop is None:
            return

        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


class Batcher:
    """The worker thread and its queue.

    Args:
        pipe: the text-to-image pipeline; img2img/inpaint pipelines share its components (`from_pipe`).
        max_batch: images per pipeline call.
        batch_window_ms: how long the oldest batchable job waits for batch-mates.
        max_queue: jobs allowed to wait; `submit` raises `QueueFull` beyond.
    """

    def __init__(self, engine, max_batch: int, batch_window_ms: float, max_queue: int, warmup: tuple[int, ...] = ()):
        self.engine = engine
        self.max_batch = max_batch
        self.window = batch_window_ms / 1000
        self.max_queue = max_queue
        self.warmup = tuple(warmup)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.running: list[Job] = []
        self.batch_seconds = 1.0  # moving average of one call, for Retry-After
        self.stats = {"requests": 0, "images": 0, "pipeline_calls": 0, "rejected_full": 0, "dropped": 0,
                      "failed": 0, "cancelled": 0}
        self.warmup_s: float | None = None
        # Little's law inputs (moving averages): seconds between arrivals, seconds from arrival to answer
        self._last_arrival: float | None = None
        self._gap_s = 1.0
        self._latency_s = 0.0

    @property
    def concurrency(self) -> float:
        """Requests in the system on average lately (arrival rate x latency)."""
        return self._latency_s / max(self._gap_s, 1e-6)

    # ---- the server side ------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="amused-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs (503), let the running call finish, end the thread."""
        with self._cond:
            self._stop = True
            waiting, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in waiting:
            job.deliver(error=ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected_full"] += 1
                batches_ahead = len(self._queue) / self.max_batch + (1 if self.running else 0)
                raise QueueFull(max(1, math.ceil(batches_ahead * self.batch_seconds)))
            job.enqueued = now = time.monotonic()
            if self._last_arrival is not None:
                self._gap_s = 0.8 * self._gap_s + 0.2 * min(now - self._last_arrival, 10.0)
            self._last_arrival = now
            self._queue.append(job)
            self._cond.notify_all()

    def abandon(self, job: Job) -> None:
        """The request gave up (timeout): drop the job if it has not started; a running one finishes unseen."""
        with self._cond:
            job.abandoned = True
            try:
                self._queue.remove(job)
                self.stats["dropped"] += 1
            except ValueError:
                pass

    # ---- the worker -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.warmup and self.engine is not None:
            self.warmup_s = self.engine.warm_up(self.warmup)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job plus the queued jobs that can share its call; [] to look again; None to stop."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            head = self._queue[0]
            key = head.batch_key
            if key is not None and (len(self._queue) > 1 or self.concurrency >= 1.5):
                until = head.enqueued + self.window
                while (not self._stop and self._queue and self._queue[0] is head and time.monotonic() < until
                       and sum(j.num_images for j in self._queue if j.batch_key == key) < self.max_batch):
                    self._cond.wait(until - time.monotonic())
                if not self._queue or self._queue[0] is not head:  # the head was abandoned meanwhile
                    return []
            batch, images, now = [], 0, time.monotonic()
            for job in list(self._queue):
                if job.abandoned or now > job.deadline:
                    self._queue.remove(job)  # its request has answered 504 (or is about to)
                    self.stats["dropped"] += 1
                    continue
                if not batch:
                    key = job.batch_key  # the first live job leads (the head, unless it just expired)
                elif key is None or job.batch_key != key or images + job.num_images > self.max_batch:
                    continue
                self._queue.remove(job)
                batch.append(job)
                images += job.num_images
                if key is None or images >= self.max_batch:
                    break
            self.running = batch
            return batch

    def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        try:
            images, seed = self._call(batch)
        except Cancelled as e:
            self.running = []
            self.stats["cancelled"] += 1
            for job in batch:
                job.deliver(error=e)
            return
        except Exception as e:  # noqa: BLE001 (every error goes back to its request)
            self.running = []
            if len(batch) > 1:  # one bad request must not fail its batch-mates: run each alone
                for job in batch:
                    self.running = [job]
                    self._run([job])
                return
            self.stats["failed"] += 1
            batch[0].deliver(error=e)
            return
        run_s = time.monotonic() - started
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * run_s
        self.stats["pipeline_calls"] += 1
        self.running = []
        done = time.monotonic()
        for job, job_images in zip(batch, images):
            self._latency_s = 0.8 * self._latency_s + 0.2 * (done - job.enqueued)
            self.stats["requests"] += 1
            self.stats["images"] += len(job_images)
            meta = {**job.metadata, "seed": seed if len(batch) == 1 else None}
            job.deliver(JobResult(job_images, [{**meta, "image_index": k} for k in range(len(job_images))],
                                  seed if len(batch) == 1 else None, len(batch), started - job.enqueued,
                                  run_s, self._truncation_warnings(job)))

    def _stop_check(self, batch: list[Job]):
        """A step callback that stops the call once every job in it is abandoned or past its deadline (plain
        loop only: the fast path runs the whole decode as one graph, too short to need it)."""
        if self.engine.fast != "off":
            return None

        def check(step, timestep, tokens):
            now = time.monotonic()
            if all(job.abandoned or now > job.deadline for job in batch):
                raise Cancelled(f"stopped at step {step}: the request timed out or its client went away")

        return check

    def _call(self, batch: list[Job]) -> tuple[list[list[Any]], int]:
        """One pipeline call for the batch -> images per job, and the seed of the call's generator."""
        head = batch[0]
        seed = head.seed if head.seed is not None else secrets.randbits(63)
        o = head.options
        kwargs = dict(num_inference_steps=o["num_inference_steps"], guidance_scale=o["guidance_scale"],
                      temperature=o["temperature"], sampler=o.get("sampler"), generator=self.engine.generator(seed),
                      output_type="pil", callback=self._stop_check(batch))
        if len(batch) == 1:  # exactly the Python API's call, so a seed gives the same images here and there
            kwargs.update(prompt=head.prompt, negative_prompt=head.negative_prompt or None,
                          num_images_per_prompt=head.num_images)
        else:  # padded up to a warmed batch size; the padding's images are dropped
            prompts = [j.prompt for j in batch for _ in range(j.num_images)]
            negatives = [j.negative_prompt for j in batch for _ in range(j.num_images)]
            pad = self.engine.bucket(len(prompts)) - len(prompts)
            kwargs.update(prompt=prompts + [""] * pad, negative_prompt=negatives + [""] * pad)
        if head.task == "text":
            kwargs.update(height=o["height"], width=o["width"])
        elif head.task == "img2img":
            kwargs.update(image=head.image, strength=o["strength"], height=o["height"], width=o["width"])
        else:
            kwargs.update(image=head.image, mask_image=head.mask_image, strength=o["strength"])
        images = self.engine.task(head.task)(**kwargs).images
        out, i = [], 0
        for job in batch:
            out.append(images[i:i + job.num_images])
            i += job.num_images
        return out, seed

    def _truncation_warnings(self, job: Job) -> list[str]:
        encoder = getattr(self.engine.pipe, "prompt_encoder", None)
        if encoder is None:
            return []
        return [f"{name} is longer than the text encoder's {encoder.max_length} tokens; the rest was cut off"
                for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt))
                if text and encoder.count_tokens(text) > encoder.max_length]


def png_bytes(image, metadata: dict[str, Any]) -> bytes:
    """PNG file bytes with the settings in text chunks, laid out as `amused.images.save_image` writes them
    (`amused.png.encode_png`: several times faster than Pillow's encoder)."""
    from ..images import png_text
    from ..png import encode_png

    return encode_png(image, png_text(metadata))
