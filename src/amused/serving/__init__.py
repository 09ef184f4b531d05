"""The HTTP API behind `amused serve` (see amused.server): the batching worker and the FastAPI app."""
