"""What an executor refuses unless it was started to allow it: shell commands, Python modules it
was not given, HTTP hosts off its allow-list (redirects included). Real calls, on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import executors.builtins  # noqa: F401  (registers the built-in task types)
from dagsmith.errors import ErrorClass
from dagsmith.messages import TaskMessage
from executors.registry import ExecutorOptions, registry
from executors.runtime import execute


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/away":  # an allowed host sending the client to another one
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/ok")
            self.end_headers()
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


async def run(task_type: str, options: ExecutorOptions, **params: Any) -> tuple[bool, Any, Any]:
    spec = registry.get(task_type)
    assert spec is not None
    message = TaskMessage(task_id=1, attempt=1, workflow_id="w", name="t", type=task_type, params=params, timeout=10)
    return await execute(spec, message, options, 1_000_000)


async def test_http_hosts_off_the_allow_list_are_refused_even_through_a_redirect(server: int) -> None:
    only_ip = ExecutorOptions(http_allow_hosts=("127.0.0.1",))
    ok, output, _ = await run("http.request", only_ip, url=f"http://127.0.0.1:{server}/ok")
    assert ok and output["json"] == {"ok": True}
    ok, _, error = await run("http.request", only_ip, url=f"http://localhost:{server}/ok")
    assert not ok and error.error_class == ErrorClass.invalid_input and "'localhost'" in error.message
    ok, _, error = await run("http.request", only_ip, url=f"http://127.0.0.1:{server}/away")
    assert not ok and error.error_class == ErrorClass.invalid_input and "'localhost'" in error.message
    both = ExecutorOptions(http_allow_hosts=("127.0.0.1", "localhost"))
    ok, output, _ = await run("http.request", both, url=f"http://127.0.0.1:{server}/away")
    assert ok and output["json"] == {"ok": True}  # the redirect itself works where it is allowed


async def test_shell_commands_need_the_allow_shell_flag() -> None:
    ok, _, error = await run("shell.run", ExecutorOptions(), command="echo hi")
    assert not ok and error.error_class == ErrorClass.permanent and "--allow-shell" in error.message
    ok, output, _ = await run("shell.run", ExecutorOptions(allow_shell=True), command="echo hi")
    assert ok and output["exit_code"] == 0 and output["stdout"].strip() == "hi"


async def test_python_calls_reach_only_the_modules_given() -> None:
    ok, _, error = await run("python.call", ExecutorOptions(python_modules=("json",)), function="os:getcwd")
    assert not ok and error.error_class == ErrorClass.invalid_input and "--python-module os" in error.message
    allowed = ExecutorOptions(python_modules=("json",))
    ok, output, _ = await run("python.call", allowed, function="json:dumps", args=[[1, 2]])
    assert ok and output == {"result": "[1, 2]"}
    ok, _, error = await run("python.call", allowed, function="json:_default_encoder")
    assert not ok and "private" in error.message


async def test_python_calls_reach_only_what_an_allowed_module_defines_or_exports() -> None:
    """shlex imports io.StringIO: allowing shlex must not make io callable through it."""
    allowed = ExecutorOptions(python_modules=("shlex",))
    ok, output, _ = await run("python.call", allowed, function="shlex:quote", args=["a b"])
    assert ok and output == {"result": "'a b'"}
    ok, _, error = await run("python.call", allowed, function="shlex:StringIO", args=["x"])
    assert not ok and error.error_class == ErrorClass.invalid_input
    assert "is not defined by 'shlex' (it comes from '_io')" in error.message
