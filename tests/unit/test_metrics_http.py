"""Every service serves /metrics through one helper; a taken port is reported, not fatal."""

from __future__ import annotations

import socket

import httpx

from dagsmith.metrics_http import serve_metrics
from tests.support.stack import free_port


def test_a_taken_port_leaves_the_process_running_without_metrics() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        assert serve_metrics(0, taken.getsockname()[1], "controller") is None


def test_the_default_port_is_served_and_a_negative_setting_serves_nothing() -> None:
    assert serve_metrics(-1, free_port(), "evaluator") is None
    port = free_port()
    assert serve_metrics(0, port, "evaluator") == port
    assert "python_info" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_metrics_listen_on_the_address_asked_for() -> None:
    """`dagsmith dev` keeps every port on loopback; the address each listener is bound to is read
    back from the kernel's table of listening sockets."""
    port = free_port()
    assert serve_metrics(0, port, "executor", host="127.0.0.1") == port
    with open("/proc/net/tcp") as table:
        bound = {line.split()[1] for line in table.readlines()[1:] if line.split()[3] == "0A"}  # 0A: LISTEN
    assert f"0100007F:{port:04X}" in bound and f"00000000:{port:04X}" not in bound
