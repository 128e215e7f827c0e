"""The service's OpenAPI 3.1 document, generated from what the routes declare.

Each route is an `ApiRoute`: a Starlette Route that also names its request body model, its
query model, the headers it reads, its security and a model (or media type) per response
status. The same pydantic models validate the requests (token_billing.server.deps.read_model,
query_model) and build the responses (token_billing.server.schemas.respond), so the document
describes what the service really accepts and answers. pydantic's JSON Schema is draft
2020-12, which is what OpenAPI 3.1 uses, so the models' schemas go in as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

REF_TEMPLATE = "#/components/schemas/{model}"

SECURITY_SCHEMES: Mapping[str, dict[str, Any]] = {
    "supabaseAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "The signed-in user's Supabase Auth access token.",
    },
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "tb_live_... / tb_test_...",
        "description": "A token-billing API key (POST /v1/api-keys), limited to its scopes.",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "METRICS_TOKEN, when the operator set one.",
    },
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "OPERATOR_TOKEN: the operator dashboard's figures.",
    },
}
Security = Literal["supabaseAuth", "apiKey", "metricsToken", "operatorToken"]


@dataclass(frozen=True)
class Media:
    """A response that is not a JSON model: its media type, schema and description."""

    media_type: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Header:
    """A request header an operation reads."""

    name: str
    description: str
    required: bool = False
    max_length: int | None = None


Response = type[BaseModel] | Media


class ApiRoute(Route):
    """A Route with its OpenAPI operation: summary, body, query, headers, security, responses."""

    def __init__(
        self,
        path: str,
        endpoint: Callable[..., Any],
        *,
        methods: Sequence[str],
        summary: str = "",
        description: str = "",
        body: type[BaseModel] | None = None,
        body_media_type: str = "application/json",
        body_required: bool = True,
        query: type[BaseModel] | None = None,
        headers: Sequence[Header] = (),
        responses: Mapping[int, Response] | None = None,
        security: Security | tuple[Security, ...] | None = None,
        tag: str = "api",
        include_in_schema: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(
            path, endpoint, methods=list(methods), include_in_schema=include_in_schema, name=name
        )
        self.summary = summary
        self.description = description
        self.body = body
        self.body_media_type = body_media_type
        self.body_required = body_required
        self.query = query
        self.headers = tuple(headers)
        self.responses = dict(responses or {})
        # One scheme, or several any one of which will do.
        # Every method the path serves, when several routes share it (share_paths).
        self.allow: frozenset[str] | None = None
        self.security: tuple[Security, ...] = (
            () if security is None else (security,) if isinstance(security, str) else security
        )
        self.tag = tag

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow is not None and scope["method"] not in (self.methods or ()):
            # 405 naming every method of the path, not only this route's.
            raise HTTPException(405, headers={"Allow": ", ".join(sorted(self.allow))})
        await super().handle(scope, receive, send)


def share_paths(routes: Iterable[BaseRoute]) -> None:
    """Let routes that share a path (GET and POST /v1/usage) answer a 405 with all its methods."""
    by_path: dict[str, list[ApiRoute]] = {}
    for route in routes:
        if isinstance(route, ApiRoute):
            by_path.setdefault(route.path, []).append(route)
    for shared in by_path.values():
        if len(shared) > 1:
            allow = frozenset(m for r in shared for m in (r.methods or ()))
            for route in shared:
                route.allow = allow


def _models(routes: Iterable[ApiRoute]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for route in routes:
        if route.body is not None:
            wanted[(route.body, "validation")] = None
        for response in route.responses.values():
            if isinstance(response, type):
                wanted[(response, "serialization")] = None
    return list(wanted)


def _parameters(route: ApiRoute) -> list[dict[str, Any]]:
    # Path parameters ({name} in the path): ids, answered 404 when they name nothing.
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": f"The {name.replace('_', ' ')}.",
            "schema": {"type": "string"},
        }
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    if route.query is not None:
        query = route.query.model_json_schema(ref_template=REF_TEMPLATE)
        required = set(query.get("required", ()))
        for name, declared in query.get("properties", {}).items():
            prop = dict(declared)
            description = prop.pop("description", "")
            prop.pop("title", None)
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "description": description,
                    "schema": prop,
                }
            )
    for header in route.headers:
        schema: dict[str, Any] = {"type": "string"}
        if header.max_length is not None:
            schema["maxLength"] = header.max_length
        parameters.append(
            {
                "name": header.name,
                "in": "header",
                "required": header.required,
                "description": header.description,
                "schema": schema,
            }
        )
    return parameters


def _description(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else model.__name__


def openapi_document(
    routes: Iterable[BaseRoute], *, title: str, version: str, description: str = ""
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ApiRoutes among `routes` (others are not described)."""
    described = [r for r in routes if isinstance(r, ApiRoute) and r.include_in_schema]
    refs, definitions = models_json_schema(_models(described), ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for route in described:
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            operation: dict[str, Any] = {
                "operationId": f"{method.lower()}_{route.name}",
                "summary": route.summary,
                "tags": [route.tag],
                "responses": {},
            }
            if route.description:
                operation["description"] = route.description
            parameters = _parameters(route)
            if parameters:
                operation["parameters"] = parameters
            if route.body is not None:
                operation["requestBody"] = {
                    "required": route.body_required,
                    "content": {
                        route.body_media_type: {"schema": refs[(route.body, "validation")]}
                    },
                }
            if route.security:
                operation["security"] = [{scheme: []} for scheme in route.security]
            for status, response in sorted(route.responses.items()):
                if isinstance(response, Media):
                    operation["responses"][str(status)] = {
                        "description": response.description,
                        "content": {response.media_type: {"schema": dict(response.schema)}},
                    }
                else:
                    operation["responses"][str(status)] = {
                        "description": _description(response),
                        "content": {
                            "application/json": {"schema": refs[(response, "serialization")]}
                        },
                    }
            paths.setdefault(route.path, {})[method.lower()] = operation
    used = {scheme for r in described for scheme in r.security}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {name: SECURITY_SCHEMES[name] for name in sorted(used)},
        },
    }
