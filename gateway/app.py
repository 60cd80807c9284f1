"""The gateway's composition root: `uvicorn gateway.app:app`.

`create_app` only declares routes and reads no server; the lifespan connects to the event
store's database, the event store and Redis when the server starts, and closes them on
shutdown.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.schemas import SchemaGenerator

from domain.settings import StoreSettings
from gateway import builds, endpoints, stream
from gateway.auth import BearerAuth
from gateway.builds import BuildSettings
from gateway.errors import EXCEPTION_HANDLERS
from gateway.openapi import BASE_SCHEMA
from gateway.services import build_services
from gateway.settings import GatewaySettings
from trainer.modelstore import ModelStoreSettings

SCHEMA = SchemaGenerator(BASE_SCHEMA)


async def openapi(request: Request) -> Response:
    """This API's OpenAPI document, generated from the routes.
    ---
    summary: The OpenAPI document of this API
    responses:
      '200': {description: OpenAPI 3.1, content: {application/json: {}}}
      '401': {$ref: '#/components/responses/Error'}
    """
    return JSONResponse(SCHEMA.get_schema(routes=request.app.routes))


ROUTES: list[BaseRoute] = [
    Route("/jobs", endpoints.submit_job, methods=["POST"]),
    Route("/jobs", endpoints.list_jobs, methods=["GET"]),
    Route("/jobs/{job_id}", endpoints.get_job, methods=["GET"]),
    Route("/jobs/{job_id}/cancel", endpoints.cancel_job, methods=["POST"]),
    Route("/jobs/{job_id}/metrics", endpoints.job_metrics, methods=["GET"]),
    Route("/jobs/{job_id}/events", endpoints.job_events, methods=["GET"]),
    Route("/jobs/{job_id}/model", endpoints.job_model, methods=["GET"]),
    WebSocketRoute("/jobs/{job_id}/stream", stream.job_stream),
    Route("/nodes", endpoints.list_nodes, methods=["GET"]),
    Route("/builds", builds.upload_build, methods=["POST"]),
    Route("/builds/{sha256}", builds.get_build, methods=["GET"]),
    Route("/healthz", endpoints.healthz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


def create_app(
    settings: GatewaySettings | None = None,
    store: StoreSettings | None = None,
    model_store: ModelStoreSettings | None = None,
    build_settings: BuildSettings | None = None,
    *,
    settle_heap: bool = False,
) -> Starlette:
    """The gateway app; settings default to the TRAINYARD_* environment.

    `settle_heap`: once started, freeze the objects start-up created out of the garbage
    collector's way (full collections would walk them all and stall every connection); for
    the served app of a process, not for apps built in tests.
    """
    gateway_settings = settings or GatewaySettings()
    store_settings = store or StoreSettings()
    model_store_settings = model_store or ModelStoreSettings()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        services = await anyio.to_thread.run_sync(
            build_services, gateway_settings, store_settings, model_store_settings
        )
        if settle_heap:
            gc.collect()
            gc.freeze()
        try:
            yield {"services": services}
        finally:
            await services.aclose()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(BearerAuth)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # Read now, so a bad TRAINYARD_BUILD_* value stops the server at start, not at an upload.
    app.state.build_settings = build_settings or BuildSettings()
    return app


app = create_app(settle_heap=True)
