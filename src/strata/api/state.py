"""What the routes need from the running app, as one typed object on `app.state.strata`."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.config import StrataConfig
from strata.serving.chat import ChatService
from strata.serving.router import Router


@dataclass
class Lifecycle:
    """Set by the server runner when shutdown begins, so /readyz can tell load balancers to go away."""

    draining: bool = False


@dataclass
class AppState:
    config: StrataConfig
    router: Router
    chat: ChatService
    started_at: float
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
