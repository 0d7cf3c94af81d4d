"""The code of an earlier commit, for benchmarks that compare against it in one run."""
import contextlib
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout under test


@contextlib.contextmanager
def worktree(ref):
    """The repository at commit `ref`, checked out into a temporary folder (removed afterwards).
    A `ref` that git cannot check out is a UsageError (the caller has this checkout on sys.path;
    a timed process, which imports another commit's code, never gets here)."""
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as parent:
        path = os.path.join(parent, "code")
        added = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, ref],
                               capture_output=True, text=True)
        if added.returncode != 0:
            from config import UsageError
            lines = added.stderr.strip().splitlines() or ["git worktree add failed"]
            raise UsageError(f"--ref {ref}: {lines[-1]}")  # git's 'fatal: ...' line
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)
