"""`DirectRoute`: the route class of the API's hottest route (POST /v1/jobs).

FastAPI documents a DirectRoute from its declaration like any other, but calls its endpoint
with the Request alone: no per-request parameter solving (query string, headers and cookies
parsed into a dependency walk) and no response validation. On a submission that machinery
was about a sixth of the API process's CPU (bench/api.py, profiled with py-spy). The
endpoint reads its inputs with the same functions the dependencies use (service.api.deps) and
returns a finished Response; what its signature no longer declares (headers, the bearer
security, the body) it documents with `openapi_extra`. It takes no dependencies (it could
not run them), and FastAPI's per-operation telemetry (UNROLL_OTEL) does not see it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class DirectRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        parameters = list(inspect.signature(endpoint).parameters.values())
        if len(parameters) != 1 or not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"a DirectRoute endpoint is `async def {endpoint.__name__}(request: Request) -> Response`")
        super().__init__(path, endpoint, **kwargs)
        if self.dependant.dependencies:  # e.g. a router's `dependencies=`: they would never run
            raise TypeError(f"a DirectRoute runs no dependencies; {endpoint.__name__} was given some")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint
