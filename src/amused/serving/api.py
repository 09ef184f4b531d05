"""The FastAPI app: schemas with bounds, the routes, error mapping and the request-size limit.

Every bad input is answered with a JSON body naming the field, never a 500:
    413 body over the limit; 415 neither JSON nor multipart; 422 a field out of bounds, of the wrong type,
    an undecodable image or a size that is not a multiple of the model's token size; 400 the pipeline
    refused the arguments (its ValueError/TypeError message); 422 also a request whose work (pixels x images x
    (steps + DECODE_STEPS)) is over the server's `max_work`; 403 a Host header that is not the server's own or a
    cross-origin request (DNS rebinding, other web pages); 503 the queue is full (Retry-After), the server is
    stopping, or it is still warming up (/health); 504 the request's time ran out (dropped if it had not started).
Error bodies are `{"error": code, "message": text, "detail": ...}`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any, Literal

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from ..images import decode_base64_image
from ..server import ServerSettings
from ..runtime import Engine
from .batcher import Batcher, Cancelled, Job, QueueFull, ShuttingDown, png_bytes

MAX_PROMPT_CHARS = 2000  # far beyond any text encoder's window; longer prompts are cut (and a warning says so)
MAX_IMAGES = 8
# A request's work counts the VQ decode of each image (and img2img/inpaint's encode) as this many steps: on the
# embedded model on a CPU, 8 images of 256x256 at ONE step took 47-66 s, mostly decoding, where pixels x steps alone
# ranked them below a default batch (8 x 64x64 x 12 steps, about 8 s). docs/reliability.md, Attack set.
DECODE_STEPS = 4

# ----------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------

Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="what to steer away from")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="fixes the images (the request then runs "
                             "unbatched); without one the server picks one and may batch the request")
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="decoding steps (model default)")
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                         description="classifier-free guidance; > 1 turns it on (model default)")
    temperature: Temperature | tuple[Temperature, Temperature] | None = Field(
        None, description="start of the confidence-noise ramp, or [start, end] (model default)")
    sampler: Literal["confidence", "halton"] | None = Field(
        None, description="which samples stay revealed each step: the most confident (MaskGIT) or a fixed Halton "
                          "order of positions (model default)")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images for this prompt")
    response_format: Literal["json", "png"] | None = Field(
        None, description="'png': the image itself (num_images 1); 'json': base64 PNGs and the settings. "
                          "Default: PNG if the Accept header prefers image/png, else JSON")

    @field_validator("seed", "num_inference_steps", "guidance_scale", "temperature", "num_images", "height", "width",
                     "strength", mode="before", check_fields=False)
    @classmethod
    def _no_booleans(cls, value):
        """true/false is not a number here (pydantic would read it as 1/0). Digit strings still convert: multipart
        form fields arrive as text."""
        if isinstance(value, bool) or isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError("must be a number, not true/false")
        return value


Side = Annotated[int, Field(ge=1, le=16384)]


class GenerateRequest(Common):
    height: Side | None = Field(None, description="pixels, a multiple of the model's token size (native)")
    width: Side | None = Field(None, description="pixels, a multiple of the model's token size (native)")


class Img2ImgRequest(Common):
    image: str = Field(description="the starting image: base64 PNG/JPEG/WebP (a data: URL works too)")
    strength: float = Field(0.5, gt=0, le=1, allow_inf_nan=False,
                            description="fraction of the schedule to run, in (0, 1]; 1 regenerates everything")
    height: Side | None = Field(None, description="resize the image to this height first")
    width: Side | None = Field(None, description="resize the image to this width first")


class InpaintRequest(Common):
    image: str = Field(description="the image to edit: base64 PNG/JPEG/WebP")
    mask_image: str = Field(description="same size as image; white where to regenerate")
    strength: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="fraction of the schedule to run")


class Timing(BaseModel):
    queue_ms: float
    run_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, settings in their 'amused' text chunk")
    seed: int | None = Field(description="reproduces these images alone; null when the request was batched")
    batch_size: int = Field(description="requests that shared the pipeline call")
    settings: dict[str, Any]
    timing: Timing
    warnings: list[str]


class ErrorResponse(BaseModel):
    error: str
    message: str
    detail: Any = None


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in [
    (400, "the pipeline refused the arguments"), (413, "request body too large"),
    (415, "not JSON or multipart"), (422, "invalid field (named in detail)"),
    (503, "queue full (Retry-After) or shutting down"), (504, "timed out")]}
IMAGE_RESPONSE = {200: {"content": {"image/png": {}}, "description": "base64 PNGs as JSON, or one PNG"}}


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers


def invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def request_body_doc(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    """OpenAPI requestBody for routes that take JSON (base64 images) or multipart (uploaded files)."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for name in files:
        form["properties"][name] = {"type": "string", "format": "binary", "description": schema["properties"][
            name].get("description", "")}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


# ----------------------------------------------------------------------------------------------------------
# Request-size limit (pure ASGI, so it also stops chunked bodies without a Content-Length)
# ----------------------------------------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen, exceeded = 0, False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                exceeded = True
                raise _TooLarge
            return message

        async def guarded_send(message):  # once over the limit, whatever the app answers is replaced by 413
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if exceeded:
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"error": "body_too_large", "message": f"request body over {self.max_bytes} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})


# ----------------------------------------------------------------------------------------------------------
# Host and Origin checks (pure ASGI): no other web page, and no DNS-rebound name, can drive a local server
# ----------------------------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _host_name(value: str) -> str:
    """'[::1]:8000' -> '::1'; 'example.com:80' -> 'example.com' (lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class HostGuard:
    """403 unless the Host header names the server (its bound address, a loopback name, or one of
    `allowed_hosts`; any host when bound to all interfaces without a list) and any Origin header is the server
    itself or one of `allowed_origins`."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, allowed_origins: tuple[str, ...]):
        self.app = app
        self.hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return await _forbid(send, f"Host {host!r:.100} is not this server's; start it with --allowed-host "
                                       f"to accept that name")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.origins \
                and origin.lower().partition("://")[2] != host.lower():
            return await _forbid(send, f"cross-origin request from {origin!r:.100} refused; start the server with "
                                       f"--allow-origin to accept it")
        return await self.app(scope, receive, send)


async def _forbid(send, message: str) -> None:
    body = json.dumps({"error": "forbidden", "message": message}).encode()
    await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------
# The service: request -> Job -> response
# ----------------------------------------------------------------------------------------------------------

class Service:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.pipe = pipe = engine.pipe
        self.batcher = Batcher(engine, settings.max_batch, settings.batch_window_ms, settings.max_queue,
                               warmup=settings.warmup)
        factor = pipe.vae_scale_factor
        # A U-ViT that downsamples 2x needs an even token grid, else its shapes break (a 500, not a 400).
        self.multiple = factor * (2 if getattr(pipe.transformer.config, "downsample", False) else 1)
        self.native = pipe.transformer.config.sample_size * factor
        steps = pipe.resolve_defaults(None, None, None)[0]
        # Default bound on one request's work: twice a full default batch at the native size.
        self.max_work = settings.max_work or 2 * self.native ** 2 * (max(steps, 12) + DECODE_STEPS) * \
            settings.max_batch

    def check_work(self, options: dict[str, Any], num_images: int) -> None:
        """Refuse a request whose height x width x images x (steps + DECODE_STEPS) is over `max_work` (a bound on
        its time and memory)."""
        work = options["height"] * options["width"] * num_images * (options["num_inference_steps"] + DECODE_STEPS)
        if work > self.max_work:
            raise invalid("num_inference_steps", f"height x width x num_images x (num_inference_steps + "
                                                 f"{DECODE_STEPS}) = {work:,} is over this server's limit of "
                                                 f"{self.max_work:,} (--max-work); ask for fewer pixels, steps or "
                                                 f"images")

    def check_side(self, value: int, field: str) -> int:
        if value % self.multiple or value > self.settings.max_side:
            raise invalid(field, f"{field} must be a multiple of {self.multiple} and at most "
                                 f"{self.settings.max_side} pixels, got {value}")
        return value

    def decode_image(self, data: str, field: str, mode: str | None) -> PIL.Image.Image:
        """base64 (or data: URL) -> PIL image through the one image reader (`amused.images.load_image`): PNG,
        JPEG or WebP only, the declared size checked before the pixels are decoded, EXIF orientation, 16-bit
        scaling; alpha kept for images (the pipeline flattens it onto white)."""
        try:
            return decode_base64_image(data, name=field, mode=mode, max_side=self.settings.max_side)
        except ValueError as e:
            raise invalid(field, str(e)) from None

    def wants_png(self, body: Common, request: Request) -> bool:
        fmt = body.response_format
        if fmt is None:
            kinds = [t.split(";")[0].strip().lower() for t in request.headers.get("accept", "").split(",")]
            png = "image/png" in kinds and ("application/json" not in kinds
                                            or kinds.index("image/png") < kinds.index("application/json"))
            fmt = "png" if png else "json"
        if fmt == "png" and body.num_images > 1:
            raise invalid("num_images", "a PNG response holds one image; ask for JSON (response_format 'json') "
                                        "to get several")
        return fmt == "png"

    async def prepare(self, task: str, body: Common) -> tuple[dict[str, Any], Any, Any]:
        """Resolved, checked settings of a request (model defaults filled in), and its decoded images."""
        steps, guidance, temperature = self.pipe.resolve_defaults(body.num_inference_steps, body.guidance_scale,
                                                                  body.temperature)
        options: dict[str, Any] = {"num_inference_steps": int(steps), "guidance_scale": float(guidance),
                                   "temperature": tuple(map(float, temperature)) if isinstance(
                                       temperature, (tuple, list)) else float(temperature)}
        if body.sampler is not None:  # echoed (and recorded in the PNG) when asked for; else the model's default
            options["sampler"] = self.pipe.resolve_sampler(body.sampler)
        if task == "text":
            options["height"] = self.check_side(body.height or self.native, "height")
            options["width"] = self.check_side(body.width or self.native, "width")
            self.check_work(options, body.num_images)
            return options, None, None
        # Alpha is left in: the pipeline flattens it onto white.
        image = await asyncio.to_thread(self.decode_image, body.image, "image", None)
        options["strength"] = body.strength
        # img2img resizes the image to height/width when given; inpainting keeps the image's size.
        height, width = getattr(body, "height", None), getattr(body, "width", None)
        options["height"] = self.check_side(height, "height") if height else self.check_side(image.height, "image")
        options["width"] = self.check_side(width, "width") if width else self.check_side(image.width, "image")
        self.check_work(options, body.num_images)
        mask = None
        if task == "inpaint":
            mask = await asyncio.to_thread(self.decode_image, body.mask_image, "mask_image", "L")
            if mask.size != image.size:
                raise invalid("mask_image", f"mask_image is {mask.width}x{mask.height} but image is "
                                            f"{image.width}x{image.height}; they must match")
        return options, image, mask

    async def handle(self, task: str, body: Common, request: Request) -> Response:
        t0 = time.monotonic()
        png = self.wants_png(body, request)
        options, image, mask = await self.prepare(task, body)
        settings = {"task": task, "model": self.settings.model_name, "prompt": body.prompt,
                    "negative_prompt": body.negative_prompt or "", "num_images": body.num_images, **options}
        metadata = {k: settings[k] for k in ("task", "model", "prompt", "negative_prompt", "guidance_scale",
                                             "temperature", "height", "width", "sampler") if k in settings}
        metadata["steps"] = options["num_inference_steps"]  # the key `amused generate` writes
        loop = asyncio.get_running_loop()
        job = Job(task, body.prompt, body.negative_prompt or "", body.num_images, body.seed, options,
                  deadline=t0 + self.settings.timeout_s, future=loop.create_future(), loop=loop, image=image,
                  mask_image=mask, metadata=metadata)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, "queue_full", str(e), {"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ApiError(503, "shutting_down", str(e), {"Retry-After": "5"}) from None
        try:
            result = await self.wait(job, request)
        except asyncio.TimeoutError:
            self.batcher.abandon(job)
            raise ApiError(504, "timeout", f"no result within {self.settings.timeout_s:g} s "
                                           f"(queue depth {self.batcher.depth})") from None
        except (asyncio.CancelledError, _Disconnected):  # the client went away: don't run its work
            self.batcher.abandon(job)
            raise ApiError(499, "client_closed_request", "the client went away") from None
        except Cancelled as e:
            raise ApiError(504, "timeout", str(e)) from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, "invalid_argument", str(e)) from None
        except ShuttingDown as e:
            raise ApiError(503, "shutting_down", str(e), {"Retry-After": "5"}) from None
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, "internal_error", f"{type(e).__name__}: {e}") from None
        pngs = await asyncio.to_thread(lambda: [png_bytes(im, meta) for im, meta in zip(result.images,
                                                                                       result.metadata)])
        total_ms = (time.monotonic() - t0) * 1000
        if png:
            headers = {"X-Amused-Seed": "none" if result.seed is None else str(result.seed),
                       "X-Amused-Batch-Size": str(result.batch_size), "X-Amused-Time-Ms": f"{total_ms:.1f}"}
            if result.warnings:
                headers["X-Amused-Warnings"] = "; ".join(result.warnings)
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({
            "images": [base64.b64encode(p).decode() for p in pngs], "seed": result.seed,
            "batch_size": result.batch_size, "settings": settings, "warnings": result.warnings,
            "timing": {"queue_ms": round(result.queue_s * 1000, 1), "run_ms": round(result.run_s * 1000, 1),
                       "total_ms": round(total_ms, 1)}})

    async def wait(self, job: Job, request: Request, poll_s: float = 0.05):
        """The job's result; polls the connection meanwhile, so a client that gives up is noticed (and its job
        dropped, or stopped between steps) instead of its work running for nobody."""
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            done, _ = await asyncio.wait({job.future}, timeout=min(poll_s, left))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                raise _Disconnected

    async def parse(self, request: Request, model: type[Common], files: tuple[str, ...]) -> Common:
        """JSON (images as base64) or multipart/form-data (images as files) -> the validated model."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=len(files), max_fields=32,
                                          max_part_size=self.settings.max_body_bytes)
            except Exception as e:  # noqa: BLE001 (malformed multipart)
                raise RequestValidationError([{"loc": ("body",), "msg": f"malformed multipart body: {e}",
                                               "type": "multipart_invalid"}]) from None
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # an uploaded file
                    if key not in files:
                        raise invalid(key, f"{key} cannot be a file; file fields: {list(files)}")
                    data[key] = base64.b64encode(await value.read()).decode()
                elif key == "temperature" and value.strip().startswith("["):
                    data[key] = _json_or_raw(value)
                else:
                    data[key] = value
        elif ctype in ("application/json", ""):
            try:
                data = json.loads(await request.body())
            except ValueError as e:
                raise RequestValidationError([{"loc": ("body",), "msg": f"invalid JSON: {e}",
                                               "type": "json_invalid"}]) from None
        else:
            raise ApiError(415, "unsupported_media_type", f"send application/json or multipart/form-data, "
                                                           f"not {ctype}")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


class _Disconnected(Exception):
    pass


def _json_or_raw(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------

def build_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    service = Service(engine, settings)
    pipe = engine.pipe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        await asyncio.to_thread(service.batcher.stop)

    app = FastAPI(title="amused", version=_version(), lifespan=lifespan,
                  description="aMUSEd text-to-image, img2img and inpainting, with dynamic batching. "
                              "See docs/http_api.md.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostGuard, allowed_hosts=settings.host_names(), allowed_origins=settings.allowed_origins)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.error, "message": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)  # routing's own 404/405: the same JSON shape as every other error
    async def http_error(request: Request, exc: HTTPException):
        error = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return JSONResponse({"error": error, "message": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        message = "; ".join(f"{'.'.join(map(str, d['loc'][1:])) or 'body'}: {d['msg']}" for d in detail)
        return JSONResponse({"error": "invalid_request", "message": message, "detail": detail}, 422)

    @app.post("/v1/generate", response_model=GenerateResponse, responses={**IMAGE_RESPONSE, **ERRORS},
              summary="text to image")
    async def generate(body: GenerateRequest, request: Request):
        return await service.handle("text", body, request)

    @app.post("/v1/img2img", response_model=GenerateResponse, responses={**IMAGE_RESPONSE, **ERRORS},
              openapi_extra=request_body_doc(Img2ImgRequest, ("image",)), summary="image to image")
    async def img2img(request: Request):
        return await service.handle("img2img", await service.parse(request, Img2ImgRequest, ("image",)), request)

    @app.post("/v1/inpaint", response_model=GenerateResponse, responses={**IMAGE_RESPONSE, **ERRORS},
              openapi_extra=request_body_doc(InpaintRequest, ("image", "mask_image")), summary="inpainting")
    async def inpaint(request: Request):
        body = await service.parse(request, InpaintRequest, ("image", "mask_image"))
        return await service.handle("inpaint", body, request)

    @app.get("/health", summary="readiness (warming / ready), queue depth, device")
    async def health():
        b = service.batcher
        state = "down" if not b.alive else ("warming" if engine.state != "ready" or (
            b.warmup and b.warmup_s is None) else "ready")
        body = {"status": "ok" if state == "ready" else state, "state": state, "model_loaded": True,
                "model": settings.model_name, "device": str(pipe.device),
                "dtype": str(pipe.dtype).removeprefix("torch."), "fast": engine.fast,
                "warmed_batch_sizes": list(engine.warmed), "warmup_s": b.warmup_s,
                "queue_depth": b.depth, "running": len(b.running), "max_queue": settings.max_queue,
                "max_batch": settings.max_batch, "batch_window_ms": settings.batch_window_ms,
                "concurrency": round(b.concurrency, 2), "max_work": service.max_work, "size_multiple": service.multiple, "native_size": service.native,
                "stats": dict(b.stats)}
        return JSONResponse(body, 200 if state == "ready" else 503)

    return app


def _version() -> str:
    from .. import __version__

    return __version__
