"""The code of an earlier commit, for benchmarks that compare against it in one run."""
import argparse
import contextlib
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout under test


def parser(prog, description):
    """The command line parser of a benchmark that times code in child processes (`--one`): this
    checkout's config.ArgumentParser (one line, exit 2), but argparse's own in a timed process,
    which imports the code under test, maybe another commit's, and must not import ours first."""
    if "--one" in sys.argv[1:]:
        return argparse.ArgumentParser(prog=prog, description=description)
    sys.path.insert(0, ROOT)
    from config import ArgumentParser
    return ArgumentParser(prog=prog, description=description)


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
