"""The API client's handling of answers that are not the API's."""

from __future__ import annotations

import httpx
import pytest

from dagsmith.client import Client, ClientError


def test_a_page_that_is_not_the_apis_json_is_a_clear_error_not_a_traceback() -> None:
    client = Client("http://127.0.0.1:9")
    client.http = httpx.Client(
        base_url=client.base_url,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(200, text="<html>proxy</html>", headers={"content-type": "text/html"})
        ),
    )
    with pytest.raises(ClientError) as info:
        client.workflows()
    assert info.value.status == 0 and info.value.code == "not_the_api"
    assert "answered 200 with text/html, not the API's JSON" in info.value.message
    assert "DAGSMITH_API" in info.value.message
