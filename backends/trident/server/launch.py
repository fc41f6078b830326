"""Start the real Triton Inference Server on a model repository, in the foreground.

    python -m trident.server.launch [--model-repository model_repository] [--http-port 8000] ...

The binary and the backend directory come from options or the environment (TRITONSERVER_BIN,
TRITON_BACKEND_DIR), so the same repository runs inside the NGC `tritonserver` image
(/opt/tritonserver/bin/tritonserver, /opt/tritonserver/backends) and, by default, with the
`tritonserver` binary that ships in the `nvidia-pytriton` wheel (Python backend only).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trident.engine.config import ENGINE_CPUS_ENV

REPO_ROOT = Path(__file__).resolve().parents[3]
NGC_BIN = Path("/opt/tritonserver/bin/tritonserver")
NGC_BACKENDS = Path("/opt/tritonserver/backends")


@dataclass(frozen=True)
class ServerPaths:
    binary: Path
    backend_dir: Path


def find_server(binary: str | None = None, backend_dir: str | None = None) -> ServerPaths:
    """Options win, then TRITONSERVER_BIN / TRITON_BACKEND_DIR (a `tritonserver` on PATH counts as
    the binary when TRITON_BACKEND_DIR is set), then the NGC image, then the nvidia-pytriton wheel."""
    backend_dir = backend_dir or os.environ.get("TRITON_BACKEND_DIR")
    binary = binary or os.environ.get("TRITONSERVER_BIN") or (backend_dir and shutil.which("tritonserver"))
    if not binary or not backend_dir:
        default_bin, default_backends = _default_paths()
        binary = binary or str(default_bin)
        backend_dir = backend_dir or str(default_backends)
    paths = ServerPaths(Path(binary), Path(backend_dir))
    if not paths.binary.is_file():
        raise FileNotFoundError(f"tritonserver binary not found at {paths.binary} "
                                "(set --tritonserver or TRITONSERVER_BIN)")
    if not (paths.backend_dir / "python").is_dir():
        raise FileNotFoundError(f"no Python backend under {paths.backend_dir} "
                                "(set --backend-directory or TRITON_BACKEND_DIR)")
    return paths


def _default_paths() -> tuple[Path, Path]:
    if NGC_BIN.is_file():
        return NGC_BIN, NGC_BACKENDS
    try:
        import pytriton
    except ImportError as e:
        raise FileNotFoundError("no tritonserver: install nvidia-pytriton or set TRITONSERVER_BIN "
                                "and TRITON_BACKEND_DIR") from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    _install_python_stub(root)
    return root / "bin" / "tritonserver", root / "backends"


def _install_python_stub(root: Path) -> None:
    """pytriton ships one Python-backend stub per Python version; Triton looks for it next to
    libtriton_python.so, so copy the one matching this interpreter there (once)."""
    target = root / "backends" / "python" / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)


def server_env() -> dict[str, str]:
    """The environment the Python-backend stub needs to run models in *this* interpreter's world.

    The stub takes its Python from the first `python3` on PATH and ignores PYTHONPATH, so this
    interpreter's directory goes first (the models then see this venv, numpy < 2 among it). The stub
    also links `libpython3.X.so.1.0` dynamically: without help the loader may pick the system's copy
    (another patch release), whose C API does not match this interpreter's extension modules
    (`import ssl` then fails with an undefined symbol). So this interpreter's LIBDIR goes first on
    LD_LIBRARY_PATH when it holds the shared library.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


def server_command(paths: ServerPaths, model_repository: Path, http_port: int, grpc_port: int,
                   metrics_port: int, log_verbose: int = 0, extra: list[str] | None = None) -> list[str]:
    return [
        str(paths.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={paths.backend_dir}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false" if not _has_gpu() else "--allow-gpu-metrics=true",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--log-verbose={log_verbose}",
        # Instance priorities (build/bert_gpu.py: one preferred instance, the others for bursts)
        # only count under the rate limiter; without it Triton hands requests to instances in
        # turn, and a lone request lands on a cold one (H200 batch-1 p50 2.32 vs 1.99 ms).
        *([] if any(arg.startswith("--rate-limit") for arg in extra or []) else ["--rate-limit=execution_count"]),
        *(extra or []),
    ]


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


def engine_cpu_split(reserve: int = 0) -> tuple[list[int], list[int]]:
    """(the last ``reserve`` CPUs this process may use, kept for the GPT engine process alone; the
    CPUs for everything else). Never all of them.

    Why one might: the engine's loop is one thread that must run the moment the GPU finishes a step,
    and streaming a thousand requests through Triton keeps every core busy with responses. Measured
    on one H200 host (16 CPUs, docs/benchmarks.md, "Sixth session") it did not settle the question:
    streaming went from 97.6k to 137.1k tok/s with a CPU kept in one call, and from 122.9k to 96.6k
    in the next; so it is off unless asked for (``--engine-cpus``)."""
    allowed = sorted(os.sched_getaffinity(0))
    if reserve <= 0 or reserve >= len(allowed):
        return [], allowed
    return allowed[-reserve:], allowed[:-reserve]


def wait_ready(http_port: int, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Poll /v2/health/ready until the server and every model in it are ready."""
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s")


def start(model_repository: Path, http_port: int, grpc_port: int, metrics_port: int,
          binary: str | None = None, backend_dir: str | None = None, log_verbose: int = 0,
          extra: list[str] | None = None, stdout=None) -> subprocess.Popen:
    paths = find_server(binary, backend_dir)
    command = server_command(paths, model_repository.resolve(), http_port, grpc_port, metrics_port,
                             log_verbose, extra)
    # A new process group, so that Ctrl-C in the terminal reaches us once and we stop Triton cleanly.
    return subprocess.Popen(command, env=server_env(), stdout=stdout, stderr=subprocess.STDOUT,
                            start_new_session=True)


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM to Triton's whole process group: Triton starts its shutdown, and the Python-backend
    stubs (same group) hear it too, so that decoupled models answer their in-flight requests before
    Triton tries to unload them (see trident.triton.shutdown)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM lets Triton unload models (each gets finalize()); SIGKILL only if it hangs."""
    if process.poll() is None:
        terminate(process)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default=str(REPO_ROOT / "model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--tritonserver", help="path of the tritonserver binary (env TRITONSERVER_BIN)")
    parser.add_argument("--backend-directory", help="Triton backends directory (env TRITON_BACKEND_DIR)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--engine-cpus", type=int, default=0,
                        help="CPUs kept for a GPU GPT engine process alone, Triton and its stubs kept off them "
                             "(default 0: none)")
    parser.add_argument("extra", nargs="*", help="further tritonserver options, after --")
    args = parser.parse_args(argv)
    reserved, rest = engine_cpu_split(args.engine_cpus)
    if reserved:  # Triton, its stubs and their threads inherit this; the engine moves itself to `reserved`
        os.sched_setaffinity(0, rest)
        os.environ[ENGINE_CPUS_ENV] = ",".join(map(str, reserved))
        print(f"[launch] CPUs {reserved} kept for the GPT engine; Triton on the other {len(rest)}", flush=True)

    process = start(Path(args.model_repository), args.http_port, args.grpc_port, args.metrics_port,
                    args.tritonserver, args.backend_directory, args.log_verbose, args.extra)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            print(f"\n[launch] {signal.Signals(signum).name}: stopping Triton ...", flush=True)
            terminate(process)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_ready(args.http_port, process, args.ready_timeout)
        print(f"[launch] Triton READY: HTTP localhost:{args.http_port}  gRPC localhost:{args.grpc_port}  "
              f"metrics http://localhost:{args.metrics_port}/metrics  (Ctrl-C to stop)", flush=True)
    except (RuntimeError, TimeoutError) as e:
        if not stopping:
            print(f"[launch] {e}", file=sys.stderr, flush=True)
            stop(process)
            return 1
    code = process.wait()
    print(f"[launch] Triton exited with code {code}", flush=True)
    return 0 if stopping else code


if __name__ == "__main__":
    sys.exit(main())
