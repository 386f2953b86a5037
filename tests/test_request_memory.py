"""Parsing a request keeps nothing of it: pydantic's JSON parser would keep short strings (prompts, inputs)
in a cache of its own for the life of the process, 16,384 of them, unless told to keep only keys."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from p402_tui.core.types import ChatRequest
from p402_tui.gateway.bodies import validate_json
from p402_tui.gateway.embeddings import EmbeddingsBody
from p402_tui.gateway.responses_wire import ResponsesBody

BODIES = {
    ChatRequest: lambda text: {"model": "openai/gpt-4o-mini", "max_tokens": 16,
                               "messages": [{"role": "user", "content": text}]},
    ResponsesBody: lambda text: {"model": "openai/gpt-4o-mini", "input": text},
    EmbeddingsBody: lambda text: {"model": "openai/text-embedding-3-small", "input": text},
}  # fmt: skip


@pytest.mark.parametrize("model", list(BODIES), ids=lambda model: model.__name__)
def test_parsed_requests_leave_no_strings_behind(model):
    bodies = [json.dumps(BODIES[model](f"{model.__name__} question {i}: what is {i} plus one?")).encode()
              for i in range(5000)]  # fmt: skip
    validate_json(model, bodies[0])  # whatever the first parse sets up once
    gc.collect()
    tracemalloc.start()
    try:
        for body in bodies[1:]:
            validate_json(model, body)
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 20_000  # the default kept 87 bytes a prompt: 435 kB for these 4,999
