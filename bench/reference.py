"""The code of an earlier commit, for benchmarks that compare against it in one run."""
import contextlib
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout under test


@contextlib.contextmanager
def worktree(ref):
    """The repository at commit `ref`, checked out into a temporary folder (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as parent:
        path = os.path.join(parent, "code")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, ref], check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)
