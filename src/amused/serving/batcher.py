"""Dynamic batching: one worker thread owns the pipeline and runs queued requests, several at a time.

The event loop never touches the model. A request becomes a `Job` in a bounded deque; the worker takes the
oldest job and, if it is batchable, waits until `batch_window_ms` after that job arrived (or until the batch
is full) for other jobs with the same `batch_key`, then runs them all as ONE pipeline call with a list of
prompts and hands each job its share of the images.

Which jobs batch together: text-to-image jobs without a seed that share size, steps, guidance and
temperature (prompts and negative prompts may differ: the pipeline takes one per prompt). The pipeline draws
all its random numbers for a batch from one generator, so an image depends on its batch-mates; a job with a
`seed` therefore runs alone, as `pipe([prompt] * n, generator=torch.Generator().manual_seed(seed))`, and gives
the same images as the Python API or `amused generate --seed` would. img2img and inpainting jobs also run
alone (each brings its own image).

The oldest job always goes into the next batch, so later jobs that batch together cannot starve it. A job
whose deadline passed before it started, or whose client gave up, is dropped without running.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; `retry_after` is a rough wait in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class JobResult:
    pngs: list[bytes]  # one PNG per image, generation settings in its "amused" text chunk
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
        return (o["height"], o["width"], o["num_inference_steps"], o["guidance_scale"], o["temperature"])

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

    def __init__(self, pipe, max_batch: int, batch_window_ms: float, max_queue: int):
        self.pipe = pipe
        self.max_batch = max_batch
        self.window = batch_window_ms / 1000
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._task_pipes: dict[str, Any] = {}
        self.running: list[Job] = []
        self.batch_seconds = 1.0  # moving average of one call, for Retry-After
        self.stats = {"requests": 0, "images": 0, "pipeline_calls": 0, "rejected_full": 0, "dropped": 0,
                      "failed": 0}

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
            job.enqueued = time.monotonic()
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
            if key is not None:
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
            pngs, seed = self._call(batch)
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
        for job, job_pngs in zip(batch, pngs):
            self.stats["requests"] += 1
            self.stats["images"] += len(job_pngs)
            job.deliver(JobResult(job_pngs, seed if len(batch) == 1 else None, len(batch), started - job.enqueued,
                                  run_s, self._truncation_warnings(job)))

    def _task_pipe(self, task: str):
        if task == "text":
            return self.pipe
        if task not in self._task_pipes:
            from ..pipeline import AmusedImg2ImgPipeline, AmusedInpaintPipeline

            cls = AmusedImg2ImgPipeline if task == "img2img" else AmusedInpaintPipeline
            self._task_pipes[task] = cls.from_pipe(self.pipe)
        return self._task_pipes[task]

    def _call(self, batch: list[Job]) -> tuple[list[list[bytes]], int]:
        """One pipeline call for the batch -> PNGs per job, and the seed of the call's generator."""
        head = batch[0]
        seed = head.seed if head.seed is not None else secrets.randbits(63)
        o = head.options
        kwargs = dict(num_inference_steps=o["num_inference_steps"], guidance_scale=o["guidance_scale"],
                      temperature=o["temperature"], generator=torch.Generator().manual_seed(seed),
                      output_type="pil")
        if len(batch) == 1:  # exactly the Python API's call, so a seed gives the same images here and there
            kwargs.update(prompt=head.prompt, negative_prompt=head.negative_prompt or None,
                          num_images_per_prompt=head.num_images)
        else:
            kwargs.update(prompt=[j.prompt for j in batch for _ in range(j.num_images)],
                          negative_prompt=[j.negative_prompt for j in batch for _ in range(j.num_images)])
        if head.task == "text":
            kwargs.update(height=o["height"], width=o["width"])
        elif head.task == "img2img":
            kwargs.update(image=head.image, strength=o["strength"], height=o["height"], width=o["width"])
        else:
            kwargs.update(image=head.image, mask_image=head.mask_image, strength=o["strength"])
        images = self._task_pipe(head.task)(**kwargs).images
        out, i = [], 0
        for job in batch:
            meta = {**job.metadata, "seed": seed if len(batch) == 1 else None}
            out.append([png_bytes(image, {**meta, "image_index": k})
                        for k, image in enumerate(images[i:i + job.num_images])])
            i += job.num_images
        return out, seed

    def _truncation_warnings(self, job: Job) -> list[str]:
        encoder = getattr(self.pipe, "prompt_encoder", None)
        if encoder is None:
            return []
        return [f"{name} is longer than the text encoder's {encoder.max_length} tokens; the rest was cut off"
                for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt))
                if text and encoder.count_tokens(text) > encoder.max_length]


def png_bytes(image, metadata: dict[str, Any]) -> bytes:
    """PNG file bytes with the settings in text chunks, laid out as `amused.images.save_image` writes them."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("amused", json.dumps(metadata, sort_keys=True))
    info.add_text("prompt", str(metadata.get("prompt", "")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
