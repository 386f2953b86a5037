"""The adapters, one module per wire family; importing the package registers each in `core.adapters`."""

from ..core.adapters import register_wire_family
from .anthropic import AnthropicAdapter
from .azure import AzureAdapter
from .cohere import CohereAdapter
from .gemini import GeminiAdapter
from .openai_compat import OpenAICompatAdapter

for _family in (OpenAICompatAdapter, AnthropicAdapter, GeminiAdapter, CohereAdapter, AzureAdapter):
    register_wire_family(_family.wire, _family)
