"""Web servers on 127.0.0.1 for the trust tests: one serving a folder with byte ranges, and
hostile ones (accepts and never answers; answers one byte at a time, slowly)."""

from __future__ import annotations

import functools
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeHandler(SimpleHTTPRequestHandler):
    """http.server with byte ranges and no directory listings (a bucket's web endpoint)."""

    def log_message(self, *args: object) -> None:
        pass

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404, "no listings here")
        return None

    def send_head(self):  # type: ignore[no-untyped-def]
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().send_head()
        start, _, stop = rng.removeprefix("bytes=").partition("-")
        body = path.read_bytes()
        begin = int(start) if start else max(len(body) - int(stop), 0)
        end = min(int(stop) + 1, len(body)) if start and stop else len(body)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {begin}-{end - 1}/{len(body)}")
        self.send_header("Content-Length", str(end - begin))
        self.end_headers()
        return io.BytesIO(body[begin:end])


@contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving `root`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hostile(kind: str, every: float = 0.5) -> Iterator[str]:
    """127.0.0.1:PORT where `kind` is 'silent' (accepts, reads, never answers), 'trickle'
    (a valid 200 header promising 100 KB, under any size bound, then one byte every `every`
    seconds), 'flood' (a 200 header promising 100 GB, then bytes as fast as it can),
    'endless' (the same without a length: a chunked body that never ends) or 'slow-body'
    (HEAD: 404; GET: a 'trickle', so that an object store's client gets past its existence
    checks to a body)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def talk(conn: socket.socket) -> None:
        try:
            request = conn.recv(65536)
            if kind == "slow-body" and request.startswith(b"HEAD"):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                conn.close()
                return
            if kind in ("flood", "endless"):
                length = (b"Content-Length: 100000000000" if kind == "flood"
                          else b"Transfer-Encoding: chunked")
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + length + b"\r\n\r\n")
                block = b"{" * 65536
                piece = block if kind == "flood" else b"10000\r\n" + block + b"\r\n"
                while not stop.is_set():
                    conn.sendall(piece)
            elif kind in ("trickle", "slow-body"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"{")
                    time.sleep(every)
            else:
                stop.wait()
        except OSError:
            pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()
