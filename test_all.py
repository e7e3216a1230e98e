"""
Every check of the project, runnable as `python test_all.py` (or under pytest).
The runner at the bottom discovers the test_* functions in this file, runs them in order,
prints one line per test and ends with exactly `N passed, N failed[, N skipped]`.
Options: `-k SUBSTRING` runs only the tests whose name contains it; `-x` stops at the first failure.
"""
import os
import sys
import time
import traceback
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable


def shared_file(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p

# -----------------------------------------------------------------------------
# runner


def _collect():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    # during development each area keeps its tests in _tests_<area>.py; they are merged here later
    import importlib
    for p in sorted(ROOT.glob("_tests_*.py")):
        mod = importlib.import_module(p.stem)
        tests += [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and callable(f)]
    return tests


def main(argv):
    pattern = argv[argv.index("-k") + 1] if "-k" in argv else ""
    stop_first = "-x" in argv
    os.chdir(ROOT)
    passed = failed = skipped = 0
    t_all = time.time()
    for name, fn in _collect():
        if pattern not in name:
            continue
        t0 = time.time()
        try:
            fn()
        except unittest.SkipTest as e:
            skipped += 1
            print(f"SKIP {name}: {e}", flush=True)
            continue
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
            if stop_first:
                break
            continue
        passed += 1
        print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
    print(f"total time {time.time() - t_all:.0f}s", flush=True)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""), flush=True)
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
