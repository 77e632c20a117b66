"""The run directory, the room every other reads and writes runs through (it imports only config
and errors):

    paths.py       RunDir: every path of a run directory, spelled once
    metrics.py     metrics.jsonl rows: MetricsWriter, read_metrics, truncate_after, json_safe
    lock.py        one run per directory (RunLock) and nothing half-made left behind (undo_on_error)
    prepare.py     before training: is there a run to resume (check_run_dir), make or trim it (prepare_run_dir)
    checkpoint.py  the single-process checkpoint format (safetensors + meta.json, written atomically)
    members.py     a member's identity: MemberSpec(width, lr, seed) and its name
    writes.py      a failed write (full disk, read-only) as an OSError naming its file, the partial file removed
"""
from fastwidth.run.members import MemberSpec, member_specs
from fastwidth.run.paths import RunDir

__all__ = ["MemberSpec", "RunDir", "member_specs"]
