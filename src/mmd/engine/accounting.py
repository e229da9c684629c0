"""What one request is accounted as: its times and totals, for its reply and its event."""

from __future__ import annotations

from dataclasses import dataclass

from mmd.core.effects import Kind
from mmd.engine.events import RequestFinished
from mmd.runtime.upstream import Final


@dataclass
class RequestRecord:
    """Times (engine clock) and totals of one request, for its reply and its event."""

    arrived: float
    admitted: float = 0.0
    load_ms: float = 0.0
    first_token: float = 0.0
    prompt_tokens: int = 0
    final: Final | None = None

    def finished(
        self, model_id: str, kind: Kind, status: str, error: str, end: float
    ) -> RequestFinished:
        """The request's event, ended at ``end`` with ``status`` ("ok" or a status name)."""
        final = self.final
        return RequestFinished(
            model_id=model_id,
            kind=kind.value,
            status=status,
            queue_ms=((self.admitted or end) - self.arrived) * 1000,
            first_token_ms=((self.first_token or end) - self.arrived) * 1000,
            total_ms=(end - self.arrived) * 1000,
            prompt_tokens=final.prompt_tokens if final else self.prompt_tokens,
            completion_tokens=final.completion_tokens if final else 0,
            tokens_per_second=final.generation_per_second if final else 0.0,
            error=error,
        )
