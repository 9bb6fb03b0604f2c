"""service.api.direct: a DirectRoute refuses an endpoint it could not call correctly, and
dependencies it would not run."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, Request, Response

from service.api.direct import DirectRoute


def test_a_direct_route_takes_only_the_request():
    router = APIRouter()

    async def fine(request: Request) -> Response:
        return Response()

    async def with_parameters(request: Request, limit: int = 1) -> Response:
        return Response()

    def blocking(request: Request) -> Response:
        return Response()

    router.add_api_route("/fine", fine, methods=["POST"], route_class_override=DirectRoute)
    for endpoint in (with_parameters, blocking):
        with pytest.raises(TypeError, match="DirectRoute endpoint"):
            router.add_api_route("/bad", endpoint, methods=["POST"], route_class_override=DirectRoute)


def test_a_direct_route_refuses_dependencies():
    async def endpoint(request: Request) -> Response:
        return Response()

    router = APIRouter(dependencies=[Depends(lambda: None)])
    with pytest.raises(TypeError, match="runs no dependencies"):
        router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=DirectRoute)
