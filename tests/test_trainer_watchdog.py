"""trainer.watchdog: a stalled loop exits non-zero with stacks; a beating loop is left alone.

Each case runs in its own process because a stall ends the process with os._exit.
"""

import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer.watchdog import STALL_EXIT_CODE, StallWatchdog  # noqa: E402


def _run(code: str, timeout: float = 60) -> tuple:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return proc, time.monotonic() - start


def test_stall_after_beats_dumps_stacks_and_exits_non_zero_within_timeout():
    proc, elapsed = _run("""
        import threading, time
        from trainer.watchdog import StallWatchdog

        def hung_collective():   # stands in for an all-reduce whose peer died
            threading.Event().wait()

        with StallWatchdog(timeout_s=1.0) as wd:
            for step in range(1, 5):
                time.sleep(0.05)
                wd.beat(step)
            hung_collective()
        print("unreachable")
    """)
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert "unreachable" not in proc.stdout
    stall_lines = [line for line in proc.stderr.splitlines() if line.startswith("stall:")]
    assert len(stall_lines) == 1, proc.stderr
    assert "no progress for" in stall_lines[0] and "after step 4" in stall_lines[0]
    idle_s = float(stall_lines[0].split("no progress for ")[1].split(" s")[0])
    assert 1.0 <= idle_s < 5.0
    # faulthandler's dump names every thread and the frame the main thread is stuck in.
    assert "Thread 0x" in proc.stderr and "hung_collective" in proc.stderr, proc.stderr
    # Python start-up + 0.2 s of steps + 1 s timeout; generous for a loaded 2-core machine.
    assert elapsed < 30


def test_a_stall_after_the_first_beat_gets_timeout_s_not_the_first_beats_allowance():
    proc, elapsed = _run("""
        import threading, time
        from trainer.watchdog import StallWatchdog

        with StallWatchdog(timeout_s=1.0, first_beat_timeout_s=600) as wd:
            time.sleep(0.2)
            wd.beat(1)  # the first chunk (tracing) is done; from here 1 s is the bound
            threading.Event().wait()
    """)
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert "after step 1" in proc.stderr
    assert elapsed < 30


def test_regular_beats_keep_the_process_alive_and_stop_disarms():
    proc, _ = _run("""
        import time
        from trainer.watchdog import StallWatchdog
        wd = StallWatchdog(timeout_s=0.5).start()
        for step in range(30):          # 1.5 s in total, three times the timeout
            time.sleep(0.05)
            wd.beat(step)
        wd.stop()
        time.sleep(1.0)                 # stopped: no beats needed any more
        print("finished")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "finished"
    assert "stall:" not in proc.stderr


def test_stall_before_first_beat_and_on_stall_callback():
    proc, _ = _run("""
        import sys, time
        from trainer.watchdog import StallWatchdog
        def report(step, idle_s):
            print(f"on_stall step={step} idle={idle_s:.1f}", flush=True)
        StallWatchdog(timeout_s=30, first_beat_timeout_s=0.5, on_stall=report).start()
        time.sleep(30)
    """)
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert "before the first step" in proc.stderr
    assert proc.stdout.startswith("on_stall step=None idle=0.")


def test_zero_timeout_disables_the_watchdog():
    wd = StallWatchdog(timeout_s=0)
    assert not wd.enabled
    with wd:
        wd.beat(1)
        time.sleep(0.2)
    assert wd._thread is None  # no thread was ever started


def test_stop_returns_promptly_and_start_twice_is_an_error():
    wd = StallWatchdog(timeout_s=60).start()
    try:
        try:
            wd.start()
        except RuntimeError as e:
            assert "already started" in str(e)
        else:
            raise AssertionError("second start() must raise")
    finally:
        t0 = time.monotonic()
        wd.stop()
    assert time.monotonic() - t0 < 1.0
    assert not wd._thread.is_alive()


def test_importing_the_watchdog_pulls_in_neither_tensorflow_nor_horovod():
    proc, _ = _run("""
        import sys
        import trainer.watchdog
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "horovod"))
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
