"""The embedded model's server process: llama-cpp-python's OpenAI-compatible server, with its prompts left
as written.

llama-cpp-python renders the `chatml-function-calling` prompt with HTML autoescaping on, so the model reads
every quote of a tool call's JSON arguments, and of what users and tools wrote, as `&#34;` and `&#39;`, and a
small model writes them back in its answers. A prompt is not HTML: this entry point turns autoescaping off
for llama-cpp-python's chat templates. It is called in the launched model server only
(`strata.serving.embedded_server`), never in Strata's own process; Strata's own chat handler there
(`embedded_chat`) writes plain-text prompts itself, this covers every other `chat_format`.
"""

from __future__ import annotations

from typing import Any


def unescape_chat_templates() -> bool:
    """Make llama-cpp-python's chat templates render without HTML escaping; False if its layout changed."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp import llama_chat_format

    if getattr(llama_chat_format, "ImmutableSandboxedEnvironment", None) is not ImmutableSandboxedEnvironment:
        return False

    class PlainTextEnvironment(ImmutableSandboxedEnvironment):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["autoescape"] = False
            super().__init__(*args, **kwargs)

    llama_chat_format.ImmutableSandboxedEnvironment = PlainTextEnvironment  # type: ignore[misc]
    return True
