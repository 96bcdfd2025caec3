"""paths.file_lock: one holder at a time, across processes, threads, and the pyinfra CLI's greenlets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from ingestctl import paths

GREENLETS = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()  # as the pyinfra CLI does before it runs deploys/deploy.py once per host
    import sys
    from pathlib import Path
    import gevent
    from ingestctl import paths

    inside = []

    def build(name):
        with paths.file_lock(Path(sys.argv[1])):
            inside.append(name)
            assert len(inside) == 1, inside
            gevent.sleep(0.05)  # another greenlet runs here and must wait for the lock, not block the process
            inside.remove(name)
        return name

    hosts = [gevent.spawn(build, h) for h in ("app2", "app3", "db1")]
    gevent.joinall(hosts, raise_error=True)
    print(",".join(sorted(g.value for g in hosts)))
    """
)


def test_greenlets_of_one_process_take_turns_instead_of_blocking_each_other(tmp_path: Path) -> None:
    completed = subprocess.run([sys.executable, "-c", GREENLETS, str(tmp_path / "build.lock")],
                               capture_output=True, text=True, timeout=15, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "app2,app3,db1"


def test_threads_of_one_process_never_hold_it_at_once(tmp_path: Path) -> None:
    holders: list[int] = []
    most = 0

    def hold(number: int) -> None:
        nonlocal most
        with paths.file_lock(tmp_path / "x.lock"):
            holders.append(number)
            most = max(most, len(holders))
            time.sleep(0.02)
            holders.remove(number)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert most == 1


def test_another_process_waits_for_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "y.lock"
    waiter = ("import sys, time; from pathlib import Path; from ingestctl import paths\n"
              "with paths.file_lock(Path(sys.argv[1])): print(time.time())")
    with paths.file_lock(lock):
        assert lock.is_file()  # created, parents too
        process = subprocess.Popen([sys.executable, "-c", waiter, str(lock)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        released = time.time()
    out, _ = process.communicate(timeout=30)
    assert float(out) >= released
