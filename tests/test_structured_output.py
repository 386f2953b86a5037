"""JSON mode and structured output on every wire family: through `p402 serve --sim` with the OpenAI SDK's
parse helper and LangChain, and straight at the simulator with each family's own SDK and forms."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from helpers import Served

# One model of each wire family, pinned so the family is the one under test.
FAMILY_MODELS = {
    "openai": "openai/gpt-4o-mini",
    "anthropic": "anthropic/claude-haiku-4-5-20251001",
    "gemini": "google/gemini-2.5-flash",
    "cohere": "cohere/command-r-08-2024",
}
PROMPT = "Extract the invoice: ACME Corp owes $4,200 by March 3rd; lines: 2 widgets, 1 gadget."


class Currency(str, Enum):
    usd = "USD"
    eur = "EUR"


class Line(BaseModel):
    item: str
    quantity: int = Field(ge=1)


class Party(BaseModel):
    name: str
    country: str | None = None


class Invoice(BaseModel):
    """Nested models ($defs/$ref), an enum, a Literal, an optional, arrays, bounds."""

    customer: Party
    amount: float = Field(gt=0)
    currency: Currency
    status: Literal["open", "paid"]
    lines: list[Line] = Field(min_length=1)
    tags: list[str]
    due: str | None = None


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    served = Served("--sim", "--db", str(tmp_path_factory.mktemp("structured") / "p402.db"))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def client(gateway):
    import openai

    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def _parse(client):
    """The parse helper under whichever name the installed SDK has."""
    completions = client.chat.completions
    return completions.parse if hasattr(completions, "parse") else client.beta.chat.completions.parse


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_sdk_parse_helper_gets_a_schema_valid_answer(client, family):
    completion = _parse(client)(
        model=FAMILY_MODELS[family], messages=[{"role": "user", "content": PROMPT}], response_format=Invoice
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Invoice), message.content
    assert Invoice.model_validate_json(message.content) == message.parsed
    p402 = completion.model_extra["p402"]
    assert f"{p402['provider']}/{p402['model']}" == FAMILY_MODELS[family]


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode_answers_json(client, family, stream):
    asked = dict(model=FAMILY_MODELS[family], messages=[{"role": "user", "content": f"As JSON: {PROMPT}"}],
                 response_format={"type": "json_object"})
    if stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            **asked, stream=True) if chunk.choices)
    else:
        text = client.chat.completions.create(**asked).choices[0].message.content
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_langchain_with_structured_output(gateway, family):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=FAMILY_MODELS[family], base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    invoice = llm.with_structured_output(Invoice).invoke(PROMPT)
    assert isinstance(invoice, Invoice)
    assert invoice.lines and invoice.amount > 0


def test_a_schema_the_simulator_cannot_meet_is_not_asked_for(client):
    """A malformed response_format is the caller's error, in OpenAI's shape, not a prose answer."""
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=FAMILY_MODELS["openai"], messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema", "json_schema": {"schema": {}}})


# --- each family's own forms, straight at `p402 sim` ------------------------------------------------


def test_anthropic_structured_output_and_tool_forms(sim_process):
    import anthropic

    model = FAMILY_MODELS["anthropic"].split("/", 1)[1]
    with anthropic.Anthropic(base_url=f"{sim_process['url']}/anthropic", api_key="sim-key", max_retries=0) as client:
        parsed = client.messages.parse(
            model=model, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}], output_format=Invoice
        )
        assert isinstance(parsed.parsed_output, Invoice)
        tool = {"name": "record_invoice", "description": "Record it", "input_schema": Invoice.model_json_schema()}
        called = client.messages.create(
            model=model, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}], tools=[tool],
            tool_choice={"type": "tool", "name": "record_invoice"},
        )
        (block,) = called.content
        assert block.type == "tool_use" and block.name == "record_invoice"
        Invoice.model_validate(block.input)
        asked = client.messages.create(
            model=model, max_tokens=1024, system="Reply with one JSON object and nothing else.",
            messages=[{"role": "user", "content": PROMPT}],
        )
        assert isinstance(json.loads(asked.content[0].text), dict)


def test_gemini_response_schema(sim_process):
    from google import genai
    from google.genai import types

    class Simple(BaseModel):  # responseSchema is OpenAPI's subset: the SDK refuses exclusiveMinimum
        customer: Party
        lines: list[Line]
        currency: Currency

    client = genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=f"{sim_process['url']}/google"))
    model = FAMILY_MODELS["gemini"].split("/", 1)[1]
    try:
        typed = client.models.generate_content(
            model=model, contents=PROMPT,
            config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=Simple),
        )
        full = client.models.generate_content(
            model=model, contents=PROMPT,
            config=types.GenerateContentConfig(
                response_mime_type="application/json", response_json_schema=Invoice.model_json_schema()
            ),
        )
    finally:
        client.close()
    assert isinstance(typed.parsed, Simple), typed.text
    Invoice.model_validate_json(full.text)


def test_cohere_json_schema(sim_process):
    import cohere

    client = cohere.ClientV2(api_key="sim-key", base_url=f"{sim_process['url']}/cohere")
    response = client.chat(
        model=FAMILY_MODELS["cohere"].split("/", 1)[1], messages=[{"role": "user", "content": PROMPT}],
        response_format={"type": "json_object", "json_schema": Invoice.model_json_schema()},
    )
    Invoice.model_validate_json(response.message.content[0].text)
