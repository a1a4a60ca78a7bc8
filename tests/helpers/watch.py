"""A stand-in for the watcher's submitter (the pipeline side, not the PACS or the bucket)."""

from __future__ import annotations


class Recorder:
    """Records the runs the watcher asks for: ``runs`` maps each run name to its arguments; ``find`` answers like a
    pipeline server that knows only the runs submitted here."""

    can_find = True

    def __init__(self):
        self.runs: dict[str, dict] = {}

    def submit(self, run_name, arguments):
        self.runs[run_name] = arguments
        return f"run-{len(self.runs)}"

    def find(self, run_name):
        return f"run-{run_name}" if run_name in self.runs else None
