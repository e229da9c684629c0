"""How a prompt reaches a model: through its chat template, or as it is.

A lone prompt goes as the user's turn of a chat when the model's GGUF file has a chat
template (``tokenizer.chat_template``), as ``ollama run`` does: an instruction-tuned
model sent the bare text may end at once and say nothing. A model without a template
(a base model) gets the text as it is, a completion, which is what it was trained to
continue. A client that wants the text as it is anyway asks for ``raw``.

The one decision every front door (gRPC Infer, HTTP /infer) shares lives here, with the
warnings that tell a client when its request is served, but maybe not as it means.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from mmd.core.errors import InvalidRequest
from mmd.runtime.gguf import has_chat_template
from mmd.runtime.upstream import InferParams

log = logging.getLogger("mmd.engine")

_NO_TEMPLATE = "model {model!r} has no chat template in its GGUF file (no tokenizer.chat_template)"
CHAT_WARNING = (
    _NO_TEMPLATE + ": llama-server formats the chat as ChatML, which the model may not follow; "
    "without --system (or messages) the prompt is sent as it is"
)
RAW_WARNING = _NO_TEMPLATE + ": the prompt is sent as it is, for the model to continue"


class ChatTemplates:
    """Which models' files carry a chat template (read once per file version), and the
    mode and warning of each request."""

    def __init__(self, path_of: Callable[[str], Path]) -> None:
        self._path_of = path_of  # a model id's file; raises UnknownModel
        self._known: dict[tuple[Path, int, int], bool] = {}  # file version -> has one
        self._logged: set[tuple[str, bool]] = set()  # (model, chat): warned in the log

    async def has_template(self, model_id: str) -> bool:
        """True when the file has a template, and when it cannot be read (the load then
        reports the file's problem with its own error; a warning would only add noise)."""
        path = self._path_of(model_id)
        try:
            info = path.stat()
        except OSError:
            return True
        version = (path, info.st_size, info.st_mtime_ns)
        known = self._known.get(version)
        if known is None:
            # The header is read once per file version (a thread: it is disk I/O); every
            # request after that costs a stat.
            known = await asyncio.to_thread(has_chat_template, path) is not False
            self._known[version] = known
        return known

    async def warning(self, model_id: str, chat: bool) -> str:
        """For a request to a model without a template: a chat is formatted as ChatML,
        a prompt goes as it is. Logged once per model and kind; returned for each such
        client ("" when the model has a template)."""
        if await self.has_template(model_id):
            return ""
        warning = (CHAT_WARNING if chat else RAW_WARNING).format(model=model_id)
        if (model_id, chat) not in self._logged:
            self._logged.add((model_id, chat))
            log.warning("%s", warning)
        return warning

    async def prompt_mode(
        self, model_id: str, params: InferParams, raw: bool
    ) -> tuple[InferParams, str]:
        """The request as it will be sent (a lone prompt made a chat when the model has a
        template, unless ``raw``) and the warning for its client ("" for none)."""
        if raw:
            if params.messages or params.system:
                raise InvalidRequest(
                    "raw sends the prompt as it is: it cannot go with messages or a system prompt"
                )
            return params, ""
        if not params.is_chat and await self.has_template(model_id):
            return dataclasses.replace(params, chat=True), ""
        return params, await self.warning(model_id, params.is_chat)
