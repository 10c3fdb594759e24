"""A real TCP proxy in front of a real aggregator that loses answers: it forwards a request, lets the server handle
it, then drops the connection instead of relaying the answer (what a client meets when a mobile network blinks
after the request went out). Tests use it to check that a client's retry changes nothing on the server."""

from __future__ import annotations

import socket
import threading

import httpx


class LossyProxy:
    """Listen on 127.0.0.1 (a free port); for each path in ``paths``, the first ``lose`` answers to requests of it
    are lost after the server handled the request (``before``: the requests themselves are lost, the server never
    sees them). ``lost`` counts them per path."""

    def __init__(self, upstream: str, paths: tuple[str, ...], lose: int = 1, before: bool = False) -> None:
        self.upstream, self.lose, self.before = upstream, lose, before
        self.lost = dict.fromkeys(paths, 0)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._http = httpx.Client(timeout=60)
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        self._http.close()

    def __enter__(self) -> LossyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            if request is None:
                return
            method, path, headers, body = request
            with self._lock:
                lose = self.lost.get(path, self.lose) < self.lose
                if lose:
                    self.lost[path] += 1
            if lose and self.before:
                return  # the request never reaches the server
            answer = self._http.request(method, self.upstream + path, headers=headers, content=body)
            if lose:
                return  # the server did the work; the client never hears of it
            head = [f"HTTP/1.1 {answer.status_code} {answer.reason_phrase}"]
            head += [f"{k}: {v}" for k, v in answer.headers.items()
                     if k.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding")]
            head += [f"content-length: {len(answer.content)}", "connection: close"]
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.content)


def _read_request(conn: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    """One HTTP/1.1 request with a Content-Length body (what httpx sends for JSON and byte bodies)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")}
    return method, path, headers, body
