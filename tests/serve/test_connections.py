"""Connection limits, tried as the attacks they stop: header tricklers, silent connections, a flood of
connections, and idle keep-alive connections (``serve/connections.py`` on uvicorn, and gRPC's options)."""

import socket
import threading

import httpx
import orjson
import pytest

from conftest import free_port, wait_until

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})


class Server:
    """A real server on loopback with the connection settings ``run_app`` gives uvicorn."""

    def __init__(self, repo_root, **settings) -> None:
        import uvicorn

        from leanserve.serve.connections import uvicorn_config
        from leanserve.serve.settings import ServerConfig
        from leanserve.server import build_server

        self.port, self.grpc_port = free_port(), free_port()
        self.config = ServerConfig(repo=repo_root, port=self.port, grpc_port=self.grpc_port, monitor=False,
                                   access_log=False, drain_timeout_s=2.0, **settings)
        self.uvicorn = uvicorn.Server(uvicorn_config(self.config, build_server(self.config).app, lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        wait_until(self.ready, what="server ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def infer(self) -> httpx.Response:
        return httpx.post(self.url + "/v2/models/affine/infer", content=BODY, timeout=10)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def start_server(affine_repo):
    servers = []

    def start(**settings) -> Server:
        servers.append(Server(affine_repo.root, **settings))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other side closed ``sock`` (without blocking; what it sent first is read and dropped:
    a gRPC server sends its HTTP/2 settings at once)."""
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close: no TIME_WAIT pile
    return sock


def test_header_tricklers_are_closed_while_a_normal_client_is_served(start_server):
    server = start_server(header_timeout_s=1.0)
    tricklers = [connect(server.port) for _ in range(100)]
    silent = [connect(server.port) for _ in range(20)]  # connect and never send a byte
    try:
        for sock in tricklers:
            sock.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\n")
        answered = 0

        def all_closed() -> bool:
            nonlocal answered
            for sock in tricklers:  # one more header byte each round: never a complete request
                if not closed_by_peer(sock):
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
            assert server.infer().status_code == 200  # the normal client, throughout the attack
            answered += 1
            return all(closed_by_peer(sock) for sock in tricklers + silent)

        wait_until(all_closed, timeout_s=30, interval_s=0.2, what="trickling connections closed by the server")
        assert answered >= 1
        assert server.infer().status_code == 200
    finally:
        for sock in tricklers + silent:
            sock.close()


def test_a_kept_alive_connection_must_send_its_next_headers_in_time(start_server):
    server = start_server(header_timeout_s=1.0, keep_alive_timeout_s=30.0)
    sock = connect(server.port)
    try:
        request = (b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\n")  # the second request stalls in its headers
        wait_until(lambda: closed_by_peer(sock), timeout_s=20, interval_s=0.1, what="the stalled connection closed")
    finally:
        sock.close()


def test_idle_keep_alive_connections_are_closed_after_the_keep_alive_timeout(start_server):
    server = start_server(keep_alive_timeout_s=0.5, header_timeout_s=60.0)
    sock = connect(server.port)
    try:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        wait_until(lambda: closed_by_peer(sock), timeout_s=20, interval_s=0.1, what="the idle connection closed")
    finally:
        sock.close()


def test_connections_beyond_the_limit_get_503_with_retry_after(start_server):
    server = start_server(max_connections=20, header_timeout_s=60.0)
    held = [connect(server.port) for _ in range(20)]
    try:
        wait_until(lambda: len(server.uvicorn.server_state.connections) >= 20, what="held connections accepted")
        refused = server.infer()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "too many open connections" in refused.json()["error"]
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: server.infer().status_code == 200, what="served again once connections closed")


def test_grpc_connections_that_never_handshake_are_closed(start_server):
    server = start_server(header_timeout_s=1.0)
    sock = connect(server.grpc_port)
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n")  # half of the HTTP/2 preface, then nothing
        wait_until(lambda: closed_by_peer(sock), timeout_s=20, interval_s=0.1, what="the gRPC connection closed")
    finally:
        sock.close()


@pytest.mark.parametrize("flag, value, message", [
    ("--header-timeout", "0", "header_timeout_s (--header-timeout) must be a number of seconds > 0"),
    ("--keep-alive-timeout", "-1", "keep_alive_timeout_s (--keep-alive-timeout) must be a number of seconds > 0"),
    ("--max-connections", "0", "max_connections (--max-connections) must be an integer >= 1"),
])
def test_serve_refuses_bad_connection_settings(affine_repo, capsys, flag, value, message):
    from leanserve.cli import main

    assert main(["serve", str(affine_repo.root), flag, value]) == 1
    assert message in capsys.readouterr().err
