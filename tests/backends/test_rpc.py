"""Remote measurement through a real TVM RPC tracker and server started on 127.0.0.1 (a loopback "board").

Covers: a measurement through tracker + server (outputs equal to ONNX Runtime's), doctor, and the failure paths a
search must survive - the board killed in the middle of a measurement, the tracker killed, a tracker that is not
there, a key without a board - each a one-line error within a bounded time, never a hang or a traceback.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle (pip install cloudpickle)")

from hwprune.errors import BackendUnavailable, MeasurementError  # noqa: E402
from hwprune.profiles import load_profile  # noqa: E402
from hwprune.rpc_local import LocalRpc, free_port  # noqa: E402

KEY = "hwprune-test"


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def rpc():
    with LocalRpc(key=KEY) as r:
        yield r


def _profile(tracker: str, key: str = KEY, **over: object):
    settings: dict[str, object] = {"backend": "tvm-rpc", "rpc__tracker": tracker, "rpc__key": key,
                                   "rpc__session_timeout_s": 30.0, "rpc__retries": 2,
                                   "measure__warmup": 2, "measure__repeats": 10, "measure__min_repeat_ms": 0.0}
    settings.update(over)
    return load_profile("host-cpu").with_overrides(**settings)


def test_measure_through_tracker_and_server(rpc: LocalRpc, tiny_onnx: Path) -> None:
    from hwprune.export import input_feed
    from hwprune.backends import create_backend
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmRpcBackend

    backend = create_backend(_profile(rpc.tracker))
    assert isinstance(backend, TvmRpcBackend)
    m = backend.measure(tiny_onnx)
    assert m.backend == "tvm-rpc" and m.device == "host-cpu" and m.tuned is False and not m.estimated
    assert m.latency.repeats == 10 and m.latency.median_ms > 0
    # The RPC overhead per measurement, split so a user can see how many trials per hour a board serves.
    assert {"compile", "connect", "upload", "load", "timing"} <= set(m.stage_seconds)
    assert m.extra["key"] == KEY and m.extra["tracker"] == rpc.tracker
    again = backend.measure(tiny_onnx)
    assert again.extra["compile_cached"] is True and again.stage_seconds["compile"] == 0.0

    feed = input_feed(tiny_onnx, seed=5)
    remote = backend.run(tiny_onnx, feed)
    local = OrtBackend(load_profile("host-cpu")).run(tiny_onnx, feed)
    np.testing.assert_allclose(remote[0], local[0], rtol=1e-4, atol=1e-5)
    rpc.wait_for_servers(1, timeout=15)  # the session was given back: the board is free again
    backend.close()


def test_unreachable_tracker_is_backend_unavailable_with_fix() -> None:
    from hwprune.backends.tvm import TvmRpcBackend

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as exc:
        TvmRpcBackend(_profile(f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 15  # TVM's own client would retry for 60 s
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg and "\n" not in msg
    assert "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port" in msg
    assert f"python -m tvm.exec.rpc_server --tracker 127.0.0.1:{port} --key {KEY}" in msg


@pytest.mark.slow  # ~30 s: a host calibration, then TVM builds of four designs; the default run covers the transfer
# itself on ORT with 2 threads (tests/predict) and the RPC path's measurements (above)
def test_calibrate_transfers_to_the_board_through_the_tracker(rpc: LocalRpc, tmp_path: Path) -> None:
    from conftest import budget_profile, run_cli
    from hwprune.predict import store

    root = tmp_path / "cache"
    quick = str(budget_profile(tmp_path))
    # the host predictor: a short calibration (seed 7's first designs are small)
    run_cli("calibrate", "--device", quick, "--budget-seconds", "1", "--seed", "7", "--out", str(root),
            check=True, timeout=300)
    proc = run_cli("calibrate", "--device", quick, "--tracker", rpc.tracker, "--key", KEY, "--samples", "4",
                   "--budget-seconds", "60", "--out", str(root), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "sample 4/4" in proc.stderr and "via tvm-rpc" in proc.stderr
    board = store.find("host-cpu", 1, root=root, runtime="tvm-rpc")
    assert board is not None and board.transferred_from.startswith("host-cpu ort")
    assert board.fitted_on == 4 and board.validation is not None and board.validation.n_models == 1
    assert store.find("host-cpu", 1, root=root, runtime="ort").transferred_from is None  # the host's is kept
    rpc.wait_for_servers(1, timeout=15)  # every session was given back: the board is free again
    # a tracker that is not there: one line, exit 2, and the stored predictors untouched
    before = sorted(p.name for p in (root / "predictors").iterdir())
    gone = run_cli("calibrate", "--device", quick, "--tracker", f"127.0.0.1:{free_port()}", "--key", KEY,
                   "--out", str(root), timeout=120)
    last = gone.stderr.strip().splitlines()[-1]
    assert gone.returncode == 2 and last.startswith("hwprune: error:") and "rpc_tracker" in last, gone.stderr
    assert gone.stderr.count("error") == 1 and "Traceback" not in gone.stderr
    assert sorted(p.name for p in (root / "predictors").iterdir()) == before


def test_key_without_board_is_backend_unavailable(rpc: LocalRpc) -> None:
    from hwprune.backends.tvm import TvmRpcBackend

    with pytest.raises(BackendUnavailable, match=f"--tracker {rpc.tracker} --key no-such-board"):
        TvmRpcBackend(_profile(rpc.tracker, key="no-such-board"))


def test_missing_tracker_setting_says_how_to_set_it() -> None:
    from hwprune.backends.tvm import TvmRpcBackend

    with pytest.raises(BackendUnavailable, match="--tracker HOST:PORT"):
        TvmRpcBackend(load_profile("host-cpu").with_overrides(backend="tvm-rpc"))


def test_board_killed_mid_measurement_then_tracker_killed(tiny_onnx: Path) -> None:
    """A board vanishing during timing fails that measurement quickly; later ones fail fast with the reason."""
    from hwprune.backends.tvm import TvmRpcBackend

    with LocalRpc(key=KEY) as rpc:
        # Long enough on the board (30 samples of >= 200 ms) that the kill lands during timing.
        backend = TvmRpcBackend(_profile(rpc.tracker, measure__repeats=30, measure__min_repeat_ms=200.0,
                                         rpc__retries=1))
        backend.compiler.build(tiny_onnx)  # compile outside the timed window
        killer = threading.Timer(2.0, rpc.kill_servers)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(MeasurementError) as exc:
            backend.measure(tiny_onnx)
        elapsed = time.monotonic() - t0
        killer.join()
        msg = str(exc.value)
        assert elapsed < 45, f"took {elapsed:.0f} s"
        assert "\n" not in msg and f"key {KEY!r}" in msg and "attempt" in msg
        assert any(s in msg for s in ("failed during", "did not answer", "no board is registered",
                                      "did not accept")), msg

        # The board is gone: the next measurement says so without waiting for a board.
        t1 = time.monotonic()
        with pytest.raises(MeasurementError, match="no board is registered under key"):
            backend.measure(tiny_onnx)
        assert time.monotonic() - t1 < 15

        rpc.kill_tracker()
        with pytest.raises(MeasurementError, match="tracker 127.0.0.1:.* is not reachable"):
            backend.measure(tiny_onnx)


# ~21 s on a CI host; the default run keeps a board killed mid-measurement and a hung board
@pytest.mark.slow
def test_board_comes_back_between_measurements(tiny_onnx: Path) -> None:
    """Retries with backoff cover a board that restarts: the measurement after it re-registers succeeds."""
    from hwprune.backends.tvm import TvmRpcBackend

    with LocalRpc(key=KEY) as rpc:
        backend = TvmRpcBackend(_profile(rpc.tracker, rpc__retries=4))
        backend.measure(tiny_onnx)
        rpc.kill_servers()
        rpc.server_procs.clear()
        restart = threading.Timer(0.5, rpc.start_server)
        restart.start()
        m = backend.measure(tiny_onnx)  # first attempts see no board; a later one gets the restarted server
        restart.join()
        assert m.latency.median_ms > 0


def test_doctor_tvm_rpc(rpc: LocalRpc) -> None:
    from hwprune.doctor import board_tracker, doctor, format_checks

    checks = doctor(_profile(rpc.tracker))
    names = [c.name for c in checks]
    assert all(c.ok for c in checks), format_checks(checks)
    assert {"tracker reachable", "board registered", "tiny model runs on the board"} <= set(names)
    assert any("1 board(s)" in c.detail for c in checks)

    bad = doctor(_profile(f"127.0.0.1:{free_port()}", key="rpi4"))
    failed = [c for c in bad if not c.ok]
    assert [c.name for c in failed] == ["tracker reachable"]
    board, _ = board_tracker("127.0.0.1")  # the board is told this host's LAN address, not its own loopback
    assert f"python -m tvm.exec.rpc_server --tracker {board}:" in failed[0].fix and "--key rpi4" in failed[0].fix
    assert "fix: " in format_checks(bad)

    nokey = doctor(_profile(rpc.tracker, key="rpi4"))
    failed = [c for c in nokey if not c.ok]
    assert [c.name for c in failed] == ["board registered"] and "--key rpi4" in failed[0].fix


def test_doctor_tells_the_board_this_hosts_lan_address_not_loopback() -> None:
    """127.0.0.1 is where hwprune on this host reaches a tracker; on a board it is the board itself."""
    import ipaddress

    from hwprune.doctor import board_tracker, doctor, lan_address

    lan = lan_address()  # a UDP connect: picks a route, sends nothing
    assert lan is None or not ipaddress.ip_address(lan).is_loopback
    for host in ("127.0.0.1", "localhost", "::1"):
        board, note = board_tracker(host)
        assert board == (lan or "HOST_IP") and f"{host} works only for an rpc_server on this host" in note
    assert board_tracker("192.168.1.10") == ("192.168.1.10", "")  # an address the board can reach stays as it is
    port = free_port()
    fix = next(c for c in doctor(_profile(f"127.0.0.1:{port}", key="rpi4")) if not c.ok).fix
    assert f"rpc_server --tracker {lan or 'HOST_IP'}:{port} --key rpi4" in fix
    assert "rpc_tracker --host 0.0.0.0" in fix and "replace it" in fix or lan is None


def test_hung_board_is_bounded(tiny_onnx: Path) -> None:
    """A board that stops answering without closing its socket (frozen, cable pulled) cannot hang the caller."""
    import os
    import signal

    from hwprune.backends.tvm import TvmRpcBackend

    with LocalRpc(key=KEY) as rpc:
        # the bound is the tracker wait (5 s at least) plus twice the session timeout: 11 s here
        backend = TvmRpcBackend(_profile(rpc.tracker, rpc__session_timeout_s=3.0, rpc__retries=0,
                                         measure__repeats=30, measure__min_repeat_ms=100.0))
        backend.compiler.build(tiny_onnx)
        pgid = rpc.server_procs[0].pid
        freeze = threading.Timer(1.5, lambda: os.killpg(pgid, signal.SIGSTOP))
        freeze.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(MeasurementError, match="did not answer within"):
                backend.measure(tiny_onnx)
            assert time.monotonic() - t0 < 60
        finally:
            freeze.join()
            os.killpg(pgid, signal.SIGCONT)


@pytest.mark.slow
def test_tuning_measures_candidates_on_the_board(rpc: LocalRpc, tmp_path: Path) -> None:
    """With tuning_trials > 0 over tvm-rpc, MetaSchedule's candidates are timed on the board (RPC runner) and the
    records go to a database kept per profile, target and device key."""
    from hwprune.doctor import write_tiny_model
    from hwprune.backends.tvm import TvmRpcBackend, tuning_db_dir

    model = write_tiny_model(tmp_path / "t.onnx")
    profile = _profile(rpc.tracker, tvm__tuning_trials=8, rpc__session_timeout_s=60.0)
    m = TvmRpcBackend(profile).measure(model)
    assert m.tuned is True and m.stage_seconds["tune"] > 0
    db = tuning_db_dir(profile)
    assert db.name.endswith(f"-{KEY}") and str(db).startswith(str(tmp_path))
    assert len((db / "database_tuning_record.json").read_text().splitlines()) >= m.extra["tuning"]["tasks"]
