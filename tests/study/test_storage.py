"""Scale-out: several `hwprune search` workers on one real PostgreSQL-backed Optuna study."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from conftest import GUARD_OFF_ARGS, ROOT, TESTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (scripts/install-system-deps.sh installs them)")
    # initdb refuses to run as root: run the server as the 'postgres' system user when we are root, in a folder it
    # can reach (pytest's own temp folders are private to root)
    parent = Path(tempfile.mkdtemp(prefix="hwprune-pg-"))
    data = parent / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(parent, "postgres")
    port = _free_port()
    init = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "hwprune", "--auth=trust",
                           "-E", "UTF8"], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    server = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                               "-k", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://hwprune@127.0.0.1:{port}/postgres"
    import psycopg

    deadline = time.time() + 60
    while True:
        try:
            psycopg.connect(url).close()
            break
        except psycopg.OperationalError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(parent, ignore_errors=True)


def test_two_workers_share_one_postgres_study(postgres: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "hwprune.cli", "search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS,
            "--latency-budget-ms", "2x", "--trials", "8", "--storage", postgres, "--study", "shared",
            "--final-finetune-steps", "0"]
    # the first worker creates the study; the second joins it while it runs
    workers = [subprocess.Popen(args + ["--out", str(tmp_path / f"w{i}")], env=env, cwd=TESTS, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
               for i in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=400)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=postgres)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    # MaxTrialsCallback stops both workers once the study has 8; a trial in flight at that moment may add one more
    assert 8 <= len(complete) <= 9
    # both workers' run folders describe the same study
    for i in range(2):
        assert (tmp_path / f"w{i}" / "shared" / "summary.json").is_file()
    assert len({t.number for t in study.trials}) == len(study.trials)
