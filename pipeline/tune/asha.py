"""ASHA whose decisions survive the sweep's driver.

Tune saves the search algorithm with the experiment but not the scheduler: a sweep restored after its driver died
(pipeline.tune.sweep.build_tuner) gets the ASHA it was created with, whose rungs are empty. Each rung then judged
the first trial to reach it after the restart against nothing, and let it go on: a bad trial the uninterrupted
sweep would have stopped ran to its end, and which one depended on when the driver died. Here every record a rung
takes is written to the experiment's folder as it is taken (a few per trial), and read back when the restored
scheduler sees its first trial, so a resumed sweep stops exactly the trials the uninterrupted one would have.
"""
from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import ASHAScheduler

# In a folder of its own: at a restore Tune copies the experiment folder's top-level *.json and *.pkl files to the
# new driver's staging folder and uploads them back over storage on every sync, so a record beside them would be
# replaced by the copy taken at the restore and lose every decision taken after it.
STATE_NAME = "kpp_asha/rungs.json"


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler plus its rung records in `<experiment folder>/kpp_asha/rungs.json` (on `filesystem`, a pyarrow
    filesystem, or the local disk when None)."""

    def __init__(self, folder: str, filesystem: Any = None, **asha: Any):
        super().__init__(**asha)
        self._state_path = f"{folder.rstrip('/')}/{STATE_NAME}"
        self._state_fs = filesystem
        self._loaded = False

    def _fs(self):
        import pyarrow.fs
        return self._state_fs or pyarrow.fs.LocalFileSystem()

    def rung_records(self) -> list[dict[str, dict[str, float]]]:
        """Per bracket, {milestone: {trial_id: the reward recorded there}}."""
        return [{str(milestone): dict(recorded) for milestone, recorded in bracket._rungs}
                for bracket in self._brackets]

    def _load(self) -> None:
        import pyarrow.fs
        self._loaded = True
        fs = self._fs()
        if fs.get_file_info(self._state_path).type == pyarrow.fs.FileType.NotFound:
            return
        with fs.open_input_stream(self._state_path) as f:
            saved = json.loads(f.read())
        for bracket, rungs in zip(self._brackets, saved):
            for milestone, recorded in bracket._rungs:
                recorded.update(rungs.get(str(milestone), {}))

    def _save(self) -> None:
        fs = self._fs()
        fs.create_dir(self._state_path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(self._state_path) as f:
            f.write(json.dumps(self.rung_records()).encode())

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:
            self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self._loaded:
            self._load()
        before = sum(len(r) for b in self._brackets for _, r in b._rungs)
        action = super().on_trial_result(tune_controller, trial, result)
        if sum(len(r) for b in self._brackets for _, r in b._rungs) != before:
            self._save()  # before the decision takes effect: a driver killed after it cannot take it back
        return action
