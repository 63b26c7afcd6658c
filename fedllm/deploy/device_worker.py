"""The device's resident worker: one long-lived process that keeps the frozen base and the
tokenised data loaded and answers every request the per-message ClientApp passes on.

Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for every message and
every SecAgg+ stage, and keeping a model resident is an open Flower request (flower#3670).
So the daemon starts this worker next to the SuperNode (`fedllm client`), and the ClientApp
hands it the request over a Unix socket in the state directory (`call`). The ClientApp
itself then imports neither torch nor the model's libraries.

The socket is the device's own: the file is mode 0600 in a 0700 directory, and every
connection must prove it knows a fresh random key (`worker.key`, mode 0600) through
`multiprocessing.connection`'s HMAC challenge before anything is read from it.
Requests are answered one at a time, as a device trains one round at a time.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import traceback
from pathlib import Path
from typing import Any

SOCKET = "worker.sock"
KEY = "worker.key"
log = logging.getLogger("fedllm.worker")


def worker_dir(state_dir: Path) -> Path:
    return Path(state_dir) / ".worker"


def serve(state_dir: Path, ready=None) -> None:
    """Answer requests until killed. `ready()` is called once the socket listens."""
    from multiprocessing.connection import Listener

    from fedllm import device_requests
    from fedllm.errors import FedllmError

    folder = worker_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    key = secrets.token_bytes(32)
    key_path = folder / KEY
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    socket_path = folder / SOCKET
    socket_path.unlink(missing_ok=True)
    with Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        socket_path.chmod(0o600)
        log.info("device worker listening on %s", socket_path)
        if ready is not None:
            ready()
        while True:
            try:
                connection = listener.accept()  # the HMAC challenge: a peer without the key is dropped here
            except Exception as exc:  # noqa: BLE001 (a failed handshake must not stop the worker)
                log.warning("refused a connection: %s", exc)
                continue
            with connection:
                try:
                    kind, request = connection.recv()
                    connection.send(("ok", device_requests.HANDLERS[kind](request)))
                except FedllmError as exc:
                    connection.send(("error", str(exc)))
                except Exception as exc:  # noqa: BLE001 (the next round must still find the worker)
                    log.error("request failed:\n%s", traceback.format_exc())
                    try:
                        connection.send(("error", f"{type(exc).__name__}: {exc}"))
                    except OSError:
                        pass


class WorkerUnavailable(RuntimeError):
    """The ClientApp could not reach the device's worker."""


def call(folder: Path, kind: str, request) -> Any:
    """Send one request to the worker in `folder` and return its answer (raising its error)."""
    from multiprocessing.connection import Client

    from fedllm.errors import FedllmError

    try:
        key = (Path(folder) / KEY).read_bytes()
        connection = Client(str(Path(folder) / SOCKET), family="AF_UNIX", authkey=key)
    except (OSError, EOFError) as exc:
        raise WorkerUnavailable(f"the device worker in {folder} is not running ({exc})") from exc
    with connection:
        connection.send((kind, request))
        status, value = connection.recv()
    if status != "ok":
        raise FedllmError(f"device worker: {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.deploy.device_worker")
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    serve(args.state_dir, ready=lambda: print("device worker ready", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
