"""Shipping files agree with the code: Dockerfile, compose, systemd, configs/, the README table.

No Docker engine runs here, so the image is checked by what can be checked: hadolint, and the
Dockerfile's entrypoint, user, volume, port and healthcheck against the CLI and the settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar.arm_model import JOIN_PERMISSION, READ_PERMISSION, WRITE_PERMISSION
from sidecar.settings import Settings, env_name, render_value
from tests.conftest import SidecarFactory
from tests.support import Simulator, child_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings.model_construct()


def tool(name: str) -> str:
    """The tool's path; skips without it, unless CI insists on every check running."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.environ.get("CI_REQUIRE_ALL"):
        pytest.fail(f"{name} is required in CI (.ci/run installs it)")
    pytest.skip(f"{name} is not installed")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env
    )


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments of the final stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    final_stage = text.split("\nFROM ")[-1]
    instructions: dict[str, list[str]] = {}
    for line in final_stage.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def test_dockerfile_agrees_with_the_cli_and_the_settings() -> None:
    image = dockerfile()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(image["ENTRYPOINT"][0]) == ["sidecar"] == list(scripts)
    assert json.loads(image["CMD"][0]) == ["run"]
    assert image["EXPOSE"] == [str(DEFAULTS.port)]
    assert json.loads(image["VOLUME"][0]) == [str(DEFAULTS.state_file.parent)]
    assert image["STOPSIGNAL"] == ["SIGTERM"]
    user = image["USER"][0].split(":")[0]
    assert user not in ("0", "root")
    assert f"chown sidecar:sidecar {DEFAULTS.state_file.parent}" in image["RUN"][0]
    assert f"--uid {user}" in image["RUN"][0]
    assert image["HEALTHCHECK"][0].endswith('CMD ["sidecar", "healthcheck"]')
    help_text = run(sys.executable, "-m", "sidecar", "--help").stdout
    for command in ("run", "healthcheck", "simulate"):
        assert re.search(rf"^\s+{command}\s", help_text, re.MULTILINE), command
    assert "--require-hashes" in (ROOT / "Dockerfile").read_text()


def test_dockerfile_needs_no_registry_but_the_base_image() -> None:
    """Found by a real build: `# syntax=docker/dockerfile:1` makes BuildKit pull a frontend image
    at build time, so an offline or mirrored build fails there; no instruction here needs it."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    assert [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")] == [
        "${PYTHON_IMAGE}",
        "${PYTHON_IMAGE}",
    ]


def pinned_names(lock: str) -> set[str]:
    return {
        match.group(1).lower().replace("_", "-")
        for match in re.finditer(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock, re.MULTILINE)
    }


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_build_backend_is_pinned_with_hashes_too() -> None:
    """Found by a real build: `pip wheel .` fetched hatchling unpinned, the one part of the image
    outside the hashes. The wheel is built by the locked backend, with build isolation off."""
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    lock = (ROOT / "requirements-build.lock").read_text()
    pinned = pinned_names(lock)
    for requirement in build_system["requires"]:
        assert requirement_name(requirement) in pinned, f"{requirement} is not in the build lock"
    assert lock.count("--hash=sha256:") >= len(pinned) >= 2
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    assert "--require-hashes --no-deps -r requirements-build.lock" in text
    assert re.search(r"pip wheel --no-build-isolation --check-build-dependencies\b", text)
    assert "!requirements-build.lock" in (ROOT / ".dockerignore").read_text().splitlines()


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "requirements.lock").read_text()
    pinned = pinned_names(lock)
    for requirement in project["dependencies"]:
        name = requirement_name(requirement)
        assert name in pinned, f"{name} is not pinned in requirements.lock"
    assert lock.count("--hash=sha256:") >= len(pinned)


def test_healthcheck_is_liveness_not_readiness(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    env = child_env({"SIDECAR_PORT": str(sidecar.port)})
    check = [sys.executable, "-m", "sidecar", "healthcheck"]
    assert run(*check, env=env).returncode == 0
    simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    assert run(*check, env=env).returncode == 0, "a draining sidecar is healthy"
    sidecar.process.terminate()
    assert run(*check, env=env).returncode == 1


COMPOSE_FILES = [
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.rehearsal.yml"],
    ["docker-compose.yml", "docker-compose.drain-hook.yml"],
]


@pytest.mark.parametrize("files", COMPOSE_FILES, ids=["production", "rehearsal", "drain-hook"])
def test_compose_files_are_valid(files: list[str]) -> None:
    arguments = [part for name in files for part in ("-f", name)]
    result = run(tool("docker-compose"), *arguments, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_defaults_match_the_settings() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    found = dict(re.findall(r"^\s+(SIDECAR_\w+): \$\{\1:-([^}]*)\}$", compose, re.MULTILINE))
    assert len(found) >= 15, "the compose file should offer every everyday setting"
    example_app = {  # tied to the example's nginx, not defaults
        "SIDECAR_APP_PORTS": "80",
        "SIDECAR_APP_HEALTH_URL": "http://127.0.0.1:80/",
    }
    for variable, default in found.items():
        field = variable.removeprefix("SIDECAR_").lower()
        assert field in Settings.model_fields, f"{variable} is not a setting"
        expected = example_app.get(variable, render_value(getattr(DEFAULTS, field)))
        if field == "event_types":  # order differs, set equal
            assert set(default.split(",")) == set(expected.split(","))
        else:
            assert default == expected, f"{variable}: compose says {default!r}, code {expected!r}"
    assert f"SIDECAR_STATE_FILE: {DEFAULTS.state_file}" in compose
    assert 'network_mode: "service:web"' in compose


def service(compose: str, name: str) -> str:
    """The lines of one service of a compose file (top-level keys are indented by two)."""
    match = re.search(rf"^  {name}:\n((?:(?:    .*)?\n)*)", compose, re.MULTILINE)
    assert match, f"no service {name}"
    return match.group(1)


def test_compose_sidecar_is_hardened() -> None:
    """Asked by review; scripts/container-check runs it so and checks it still works."""
    sidecar = service((ROOT / "docker-compose.yml").read_text(), "sidecar")
    assert "read_only: true" in sidecar
    assert re.search(r"^    tmpfs:\n      - /tmp:", sidecar, re.MULTILINE)
    assert "cap_drop: [ALL]" in sidecar
    assert 'security_opt: ["no-new-privileges:true"]' in sidecar
    assert DEFAULTS.port >= 1024, "with no capabilities the probe cannot bind below 1024"


def test_rehearsal_waits_for_a_healthy_simulator_that_keeps_no_volume() -> None:
    """Found by a real run: `depends_on` did not wait for the simulator to listen (the sidecar's
    first poll failed once), and the simulator left the image's VOLUME behind as an anonymous
    volume at every `up`."""
    rehearsal = (ROOT / "docker-compose.rehearsal.yml").read_text()
    simulator = service(rehearsal, "simulator")
    port = re.search(r"- --port\n\s+- \"(\d+)\"", simulator).group(1)
    check = ["sidecar", "healthcheck", "--url", f"http://127.0.0.1:{port}/control"]
    assert f"test: {json.dumps(['CMD', *check])}" in simulator
    volume = json.loads(dockerfile()["VOLUME"][0])[0]
    assert re.search(rf"^    tmpfs:\n      - {re.escape(volume)}$", simulator, re.MULTILINE)
    assert "volumes:" not in simulator
    sidecar = service(rehearsal, "sidecar")
    assert re.search(r"depends_on:\n\s+simulator:\n\s+condition: service_healthy\n", sidecar)


def test_compose_image_is_this_version() -> None:
    for name in ("docker-compose.yml", "docker-compose.rehearsal.yml"):
        text = (ROOT / name).read_text()
        assert f"image: ${{SIDECAR_IMAGE:-azure-drain-sidecar:{__version__}}}" in text, name


def test_ci_builds_and_runs_the_image() -> None:
    """The README's main deployment is compose: CI builds the image and runs it, as a user would."""
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/container-check" in ci
    for script in ("scripts/container-check", "scripts/container-standins"):
        assert os.access(ROOT / script, os.X_OK), script
    readme = (ROOT / "README.md").read_text()
    assert "podman build --format docker" in readme, "podman drops HEALTHCHECK without it"


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = ["scripts/check", "scripts/container-check", "scripts/container-standins", ".ci/run"]
    result = run(tool("shellcheck"), "--severity=warning", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = (ROOT / "configs/systemd/azure-drain-sidecar.service").read_text()
    installed = shutil.which("sidecar", path=str(Path(sys.executable).parent))
    assert installed, "the sidecar console script of this environment"
    # verify insists that ExecStart exists: point it at this checkout's installed script
    copy = tmp_path / "azure-drain-sidecar.service"
    copy.write_text(unit.replace("/opt/azure-drain-sidecar/bin/sidecar", installed))
    result = run(analyze, "verify", str(copy))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    exposure = run(analyze, "security", "--offline=yes", str(copy)).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", exposure).group(1))
    assert score <= 2.0, f"exposure {score}: hardening was lost"


def test_systemd_files_name_only_real_settings() -> None:
    unit = (ROOT / "configs/systemd/azure-drain-sidecar.service").read_text()
    assert "DynamicUser=yes" in unit and "ProtectSystem=strict" in unit
    state_dir = re.search(r"^StateDirectory=(\S+)$", unit, re.MULTILINE).group(1)
    assert f"SIDECAR_STATE_FILE=%S/{state_dir}/state.json" in unit
    env = (ROOT / "configs/systemd/sidecar.env").read_text()
    for variable in re.findall(r"^#?(SIDECAR_\w+)=", env, re.MULTILINE):
        assert variable.removeprefix("SIDECAR_").lower() in Settings.model_fields, variable


def test_settings_reference_is_generated_from_the_model() -> None:
    result = run(sys.executable, "scripts/settings_docs.py", "--check")
    assert result.returncode == 0, result.stderr
    example = (ROOT / "configs/sidecar.env.example").read_text()
    for name in Settings.model_fields:
        assert f"#{env_name(name)}=" in example
        assert f"| `{env_name(name)}` |" in (ROOT / "README.md").read_text()


def test_azure_examples_match_the_code() -> None:
    role = json.loads((ROOT / "configs/azure/role.json").read_text())
    for permission in (READ_PERMISSION, WRITE_PERMISSION, JOIN_PERMISSION):
        assert permission in role["Actions"]
    probe = json.loads((ROOT / "configs/azure/probe.json").read_text())["properties"]
    assert (probe["protocol"], probe["port"], probe["requestPath"]) == (
        "Http",
        DEFAULTS.port,
        DEFAULTS.health_path,
    )
    interval, threshold = probe["intervalInSeconds"], probe["probeThreshold"]
    assert interval * (threshold + 1) <= DEFAULTS.min_drain_seconds <= DEFAULTS.drain_seconds
