"""The OpenAPI document is generated from the routes and lists every one of them."""

from __future__ import annotations

from starlette.routing import Route

from gateway.app import ROUTES, SCHEMA
from tests.gateway.conftest import Gateway


def test_openapi_lists_every_route_and_method(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        response = http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    listed = {(path, method) for path, ops in document["paths"].items() for method in ops}
    routed = {
        (route.path, method.lower())
        for route in ROUTES
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert routed
    assert routed - listed == set(), "routes missing from /openapi.json"
    assert listed - routed == set(), "documented operations without a route"
    for ops in document["paths"].values():
        for op in ops.values():
            assert op["summary"]
            assert op["responses"]


def test_every_reference_in_the_document_resolves() -> None:
    document = SCHEMA.get_schema(ROUTES)

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(document):
        target: object = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict)
            assert part in target, f"unresolved {ref}"
            target = target[part]
