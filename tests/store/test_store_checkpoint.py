import subprocess
import sys
import textwrap
from pathlib import Path


def test_closing_the_store_mid_checkpoint_does_not_crash_the_process(tmp_path: Path) -> None:
    """close() cancels the background WAL checkpointer; a checkpoint still running in its
    thread must finish before its connection is closed (closing it under a running
    checkpoint killed CI with SIGSEGV). Run in a child process so a crash is a failure here,
    not the end of the test run."""
    script = textwrap.dedent(f"""
        import asyncio, time
        import gateway.store.sqlite.store as m
        from gateway.store.base import CachedResult
        m.CHECKPOINT_INTERVAL_S = 0  # checkpoint back to back
        async def main():
            for i in range(60):
                s = m.SQLiteStore({str(tmp_path / "s.db")!r})
                await s.open()
                for j in range(5):
                    await s.save_result(CachedResult(key=f"k{{i}}-{{j}}", content_hash="h" * 32,
                        type="objects", params="", scope="", data_prefix=b"x" * 20000,
                        created_at=time.time()), max_bytes=10**9)
                await asyncio.sleep(0.001 * (i % 7))
                await s.close()
        asyncio.run(main())
        print("ok")
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"
