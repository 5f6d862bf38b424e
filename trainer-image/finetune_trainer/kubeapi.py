"""One raw request through a kubernetes `ApiClient`, for the operator's k8s module and the trainer's status client.

kubernetes 37 replaced the client's transport (openapi-generator's modern python client instead of python-legacy):
call_api(path, method, ..., response_type=...) became param_serialize() + call_api(method, url, ...) +
response_deserialize(); 36 had already renamed response_type to response_types_map. Both shapes are handled, so any
kubernetes from 35 on works. Nothing here imports kubernetes: the caller passes its client.
"""

from __future__ import annotations

import json
from typing import Any


def request(
    api: Any, method: str, path: str, query: list[tuple[str, Any]], headers: dict[str, str], body: Any = None
) -> Any:
    """The JSON answer decoded (None when empty); the client's ApiException for any status but 2xx."""
    if hasattr(api, "param_serialize"):  # kubernetes >= 37
        serialized = api.param_serialize(
            method, path, query_params=query, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = api.call_api(*serialized)
        response.read()
        if not 200 <= response.status <= 299:
            api.response_deserialize(response, {})  # raises the ApiException (or subclass) for the status
    else:  # kubernetes 35 and 36: without preloading, call_api returns the urllib3 response; non-2xx raise in it
        response = api.call_api(
            path,
            method,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
    return json.loads(response.data) if response.data else None
