"""A local ``tritonserver`` for development and tests (``lp-deploy triton serve``).

It runs the ``tritonserver`` 2.51 binary of the PyPI wheel ``nvidia-pytriton`` (python backend
only), unpacked by ``make triton`` into ``.triton`` without pytriton's Python dependencies, and
runs the python backend's stub in a numpy<2 environment (``.venv-triton``). The recipe (see
``../shared/ENVIRONMENT.md``): the server directory is copied to a temporary directory and the
stub for the environment's Python installed into its python backend; ``LD_LIBRARY_PATH``
holds the wheel's libraries and that Python's ``LIBDIR`` (else the stub mixes two
libpythons); ``PATH`` starts with the environment's ``bin``. The server listens on 127.0.0.1
only, in explicit model-control mode (a model that fails to load does not stop it), and is
stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lp_deploy.errors import LpDeployError

from .triton_repo import CONFIG_PBTXT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TRITON_DIR_ENV = "LP_DEPLOY_TRITON_DIR"
PYTHON_ENV_ENV = "LP_DEPLOY_TRITON_ENV"
#: the source checkout (for an editable install): where ``make triton`` puts its folders
SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: starts tried when a port picked for the server is taken before it binds it
START_TRIES = 3


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def free_ports(n: int, avoid: Collection[int] = ()) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now, none of ``avoid`` (another
    process may still take one before the server binds it: :meth:`TritonServer.start`
    retries)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        return ports


def _find(given: Path | None, env: str, name: str, what: str) -> Path:
    candidates = [given] if given else [Path(p) for p in [os.environ.get(env)] if p]
    candidates = candidates or [Path.cwd() / name, SOURCE_ROOT / name]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise LpDeployError(
        f"{what} not found (looked in {', '.join(map(str, candidates))}); build it with "
        f"'make triton' in the lp-deploy checkout, or set {env}"
    )


def triton_dir(given: Path | None = None) -> Path:
    """The unpacked ``nvidia-pytriton`` wheel (holding ``pytriton/tritonserver``)."""
    return _find(given, TRITON_DIR_ENV, ".triton", "the tritonserver wheel (.triton)")


def python_env(given: Path | None = None) -> Path:
    """The numpy<2 environment that runs the python backend's ``model.py``."""
    return _find(given, PYTHON_ENV_ENV, ".venv-triton", "the python backend's environment")


def python_info(env_dir: Path) -> tuple[str, str]:
    """``major.minor`` and ``LIBDIR`` of the Python of environment ``env_dir``."""
    info = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import sys,sysconfig;print(sys.version_info[0],"
            "sys.version_info[1],sysconfig.get_config_var('LIBDIR'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return f"{info[0]}.{info[1]}", info[2]


def backend_stub(wheel: Path, version: str) -> Path:
    """The wheel's python backend stub for Python ``version``; a clear error when it has none."""
    stubs = wheel / "pytriton" / "tritonserver" / "python_backend_stubs"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LpDeployError(f"the tritonserver wheel has no python backend stub for {version}")
    return stub


def python_models(repo: Path) -> list[str]:
    """Models of ``repo`` this server can load: those of the python backend."""
    found = []
    for cfg in sorted(repo.glob(f"*/{CONFIG_PBTXT}")):
        text = cfg.read_text()
        if 'backend: "python"' in text:
            found.append(cfg.parent.name)
    return found


@dataclass
class ServerConfig:
    """Options of ``lp-deploy triton serve``; ports 0 pick free ones."""

    repo: Path
    http_port: int = 8000
    grpc_port: int = 8001
    models: list[str] | None = None  # default: every python-backend model in the repository
    triton: Path | None = None
    env: Path | None = None
    startup_timeout: float = 180.0
    exit_timeout: int = 5
    log_verbose: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)


class TritonServer:
    """A running ``tritonserver``; ``with TritonServer(cfg) as server:`` starts it, waits
    until its models are ready, and stops it by its PID (SIGINT, then SIGKILL)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.repo = Path(cfg.repo).expanduser().resolve()
        if not self.repo.is_dir():
            raise LpDeployError(f"model repository {self.repo} does not exist")
        self.models = cfg.models if cfg.models is not None else python_models(self.repo)
        self.http_port, self.grpc_port = self._ports()
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self.log_path: Path | None = None

    def _ports(self) -> tuple[int, int]:
        """The configured ports; for 0, free ones, distinct from each other and the others."""
        http, grpc = self.cfg.http_port, self.cfg.grpc_port
        picked = iter(free_ports(2, avoid={http, grpc}))
        return http or next(picked), grpc or next(picked)

    @property
    def url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # ------------------------------------------------------------------ start

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        wheel = triton_dir(self.cfg.triton)
        env_dir = python_env(self.cfg.env)
        version, libdir = python_info(env_dir)
        stub = backend_stub(wheel, version)
        self._tmp = Path(tempfile.mkdtemp(prefix="lp-deploy-triton-"))
        server = self._tmp / "tritonserver"
        shutil.copytree(wheel / "pytriton" / "tritonserver", server, symlinks=True)
        shutil.copy2(stub, server / "backends" / "python" / stub.name)
        env = dict(os.environ)
        libs = [str(wheel / "nvidia_pytriton.libs"), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
        env.update(self.cfg.extra_env)
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            f"--exit-timeout-secs={self.cfg.exit_timeout}",
            "--model-control-mode=explicit",
            f"--log-verbose={self.cfg.log_verbose}",
            *[f"--load-model={m}" for m in self.models],
        ]
        return cmd, env

    def start(self) -> TritonServer:
        """Start the server and wait until it and its models are ready; when a port it picked
        was taken meanwhile ("already in use"), again on new ports (``START_TRIES`` in all)."""
        picked = not (self.cfg.http_port and self.cfg.grpc_port)
        for attempt in range(1, START_TRIES + 1):
            try:
                return self._start_once()
            except LpDeployError as exc:
                if not (picked and "already in use" in str(exc)) or attempt == START_TRIES:
                    raise
                log.warning("tritonserver: a port was taken, retrying on new ports: %s", exc)
                self.http_port, self.grpc_port = self._ports()
        raise AssertionError("unreachable")

    def _start_once(self) -> TritonServer:
        cmd, env = self._prepare()
        assert self._tmp is not None
        self.log_path = self._tmp / "tritonserver.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("tritonserver pid %d on %s (HTTP) / %s (gRPC)", self.pid, self.url, self.grpc_url)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        paths = ["/v2/health/ready", *[f"/v2/models/{m}/ready" for m in self.models]]
        while time.monotonic() < deadline:
            assert self.process is not None
            status = _exit_status(self.process.pid)  # not poll(): stop() kills the stubs
            if status is not None:
                raise LpDeployError(f"tritonserver exited with code {status}:\n{self.log_tail()}")
            if all(self._get(p) == 200 for p in paths):
                return
            time.sleep(0.25)
        raise LpDeployError(
            f"tritonserver was not ready after {self.cfg.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    # ------------------------------------------------------------------ repository API

    def repository_call(self, action: str, model: str) -> None:
        """``load`` or ``unload`` ``model`` through Triton's repository API."""
        req = urllib.request.Request(
            f"http://{self.url}/v2/repository/models/{model}/{action}",
            data=json.dumps({}).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.startup_timeout):
                return
        except urllib.error.HTTPError as exc:
            raise LpDeployError(f"{action} {model}: {exc.read().decode(errors='replace')}") from exc

    def model_ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready") == 200

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server by its PID (SIGINT, then SIGKILL to its process group after
        ``timeout``); remove its files. A second call does nothing."""
        proc, self.process = self.process, None
        if proc is not None and proc.returncode is None:
            _stop_group(proc, timeout)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _exit_status(pid: int) -> int | None:
    """Our child ``pid``'s exit status (a signal number if killed), None while it runs; it is
    left unreaped (a zombie keeps its pid and process group from being reused), so only
    :meth:`TritonServer.stop` reaps it. ChildProcessError once it was reaped."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    return None if info is None else int(info.si_status)


def _exited(pid: int, timeout: float) -> bool:
    """Whether our child ``pid`` exited within ``timeout`` s (left unreaped)."""
    deadline = time.monotonic() + timeout
    while _exit_status(pid) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than a zombie is left (Linux ``/proc``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until SIGKILL has taken the group (it is delivered asynchronously: a stub under
    load can still be running when ``killpg`` returns); a warning past ``timeout``."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            log.warning("process group %d: members alive %.0f s after SIGKILL", pgid, timeout)
            return
        time.sleep(0.02)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT the server, then SIGKILL its process group (the python backend stubs, and the
    server if it did not stop) while the unreaped server still holds the group id; then reap.
    A server reaped elsewhere is not signalled: its pid may be another process's now."""
    try:
        if not _exited(proc.pid, 0):
            os.kill(proc.pid, signal.SIGINT)
            if not _exited(proc.pid, timeout):
                log.warning(
                    "tritonserver pid %d did not stop in %.0f s: killing", proc.pid, timeout
                )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid, timeout=10.0)
    except ChildProcessError:
        log.debug("tritonserver pid %d was reaped already: not signalled", proc.pid)
    proc.wait(10)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve(cfg: ServerConfig) -> None:
    """Run a server until Ctrl-C or SIGTERM (library entry point of ``lp-deploy triton
    serve``); the server is stopped by its PID either way."""
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    server = TritonServer(cfg)
    try:
        server.start()
        print(
            f"tritonserver (pid {server.pid}) ready: HTTP http://{server.url}, gRPC "
            f"{server.grpc_url}; models {', '.join(server.models) or '(none)'}. Ctrl-C stops it.",
            flush=True,
        )
        assert server.process is not None
        info = os.waitid(os.P_PID, server.process.pid, os.WEXITED | os.WNOWAIT)  # not reaped
        raise LpDeployError(f"tritonserver exited with code {info.si_status if info else '?'}")
    except KeyboardInterrupt:
        print("stopping tritonserver", flush=True)
    finally:
        server.stop()
