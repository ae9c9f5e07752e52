"""Ray Core code through ``import nbcluster as ray``: automatic start, ``util.ActorPool``,
``util.queue.Queue``, each against real clusters."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.conftest import ROOT, run_script
from tests.multinode import Procs

STARTED = "Started a local nbcluster instance at"


def _run(code: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    # An empty $NBCLUSTER_ADDRESS is no address: a local start even under a Jupyter server's head.
    env = {"NBCLUSTER_ADDRESS": "", **(env or {})}
    proc = run_script(textwrap.dedent(code), timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


# --- automatic start ---------------------------------------------------------------------------


def test_remote_and_get_without_init_start_a_local_cluster() -> None:
    out, err = _run(
        """
        import nbcluster as ray

        @ray.remote
        def square(x):
            return x * x

        assert not ray.is_initialized()
        print("RESULT", ray.get([square.remote(i) for i in range(4)]))
        assert ray.is_initialized()
        print("LOCAL", ray.get_runtime_context().get_node_id() != "")
        """
    )
    assert "RESULT [0, 1, 4, 9]" in out
    assert "LOCAL True" in out
    assert err.count(STARTED) == 1, err
    assert " INFO nbcluster -- " in err  # shown although logging is not configured


def test_put_first_then_shutdown_and_use_again_starts_again() -> None:
    out, err = _run(
        """
        import logging
        logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
        import nbcluster as ray

        ref = ray.put(41)
        print("GOT", ray.get(ref) + 1)
        first = ray.cluster_resources()
        ray.shutdown()
        assert not ray.is_initialized()
        print("AGAIN", ray.get(ray.put("x")), sorted(first))
        """
    )
    assert "GOT 42" in out
    assert "AGAIN x ['CPU'" in out
    # With logging configured the line goes through it (once per start), not around it.
    assert err.count(f"LOG INFO {STARTED}") == 2, err
    assert " INFO nbcluster -- " not in err


def test_threads_racing_to_start_get_one_cluster() -> None:
    out, err = _run(
        """
        import threading
        import nbcluster as ray
        from nbcluster.client import current

        barrier = threading.Barrier(4)
        clients, refs, errors = [], [], []

        def use(i):
            try:
                barrier.wait(10)
                refs.append(ray.put(i))
                clients.append(current.get())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=use, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        print("CLIENTS", len({id(c) for c in clients}), "VALUES", sorted(ray.get(refs)))
        print("NODES", len(ray.nodes()))
        """
    )
    assert "CLIENTS 1 VALUES [0, 1, 2, 3]" in out
    assert "NODES 1" in out
    assert err.count(STARTED) == 1, err


def test_nbcluster_address_joins_the_running_head(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        procs.start_head()
        node = procs.join("a", "--num-cpus", "1")
        out, err = _run(
            """
            import nbcluster as ray

            @ray.remote
            def where():
                return ray.get_runtime_context().get_node_id()

            print("NODE", ray.get(where.remote(), timeout=60))
            print("LOCAL", ray.get_runtime_context().get_node_id())
            """,
            env={
                "NBCLUSTER_ADDRESS": procs.address,
                "NBCLUSTER_TOKEN_FILE": str(procs.token_file),
            },
        )
        assert f"NODE {node}" in out
        assert f"LOCAL {node}" in out  # joined the head's node, started none of its own
        assert f"Connected to nbcluster cluster at {procs.address}." in err, err
        assert STARTED not in err
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


def test_without_a_session_the_old_error_remains_for_code_that_is_not_a_driver() -> None:
    out, _ = _run(
        """
        import os
        os.environ["NBCLUSTER_WORKER_ID"] = "w-test"  # looks like a worker: no automatic start
        import nbcluster as ray
        try:
            ray.put(1)
        except RuntimeError as exc:
            print("ERROR", exc)
        print("INIT", ray.is_initialized())
        """
    )
    assert "ERROR nbcluster is not initialized: call nbcluster.init() first" in out
    assert "INIT False" in out
