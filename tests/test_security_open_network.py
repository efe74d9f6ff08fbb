"""A server without keys stays off the network: started on an address other than loopback with
no SDXL_API_KEYS, it refuses to start, naming the settings that would let it (guards.py). The
served check starts `bentoml serve --host 0.0.0.0`, which stops before it opens any socket."""

from __future__ import annotations

import socket

import pytest

from backends.api.edge.guards import listening_addresses, refuse_open_network
from tests.served import start_that_fails


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.7", "fe80::1%eth0"])
def test_a_network_address_without_keys_is_refused_unless_allowed_open(address):
    with pytest.raises(RuntimeError, match=r"SDXL_API_KEYS.*SDXL_ALLOW_OPEN=1"):
        refuse_open_network([address], [], allow_open=False)
    refuse_open_network([address], ["a-key"], allow_open=False)
    refuse_open_network([address], [], allow_open=True)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_needs_no_key(address):
    refuse_open_network([address], [], allow_open=False)


def test_a_process_finds_the_sockets_it_listens_on():
    """(How a worker finds its server's socket, which it inherits.)"""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert "127.0.0.1" in listening_addresses()


def test_bentoml_serve_on_every_address_without_keys_does_not_start(tiny_model, tmp_path):
    server = start_that_fails({"SDXL_MODELS": "tiny-sdxl"}, tmp_path / "server.log", host="0.0.0.0")
    assert server.process.returncode != 0
    assert "listens on 0.0.0.0" in server.log() and "SDXL_ALLOW_OPEN=1" in server.log()
